"""On a GPU: the CUDA kernels (int8, tinygemm int4) against dequantise-then-matmul, the int4 layout round trip,
quantising while loading onto the GPU, and the CUDA-graph and compiled decode steps over quantised layers."""

import pytest
import torch
from reference import config_dict, make_batch, reference_model, save_reference
from test_quant_model import NAME, WIDE

from idefics import IdeficsForVisionText2Text
from idefics.quantization import Int4Linear, Int8Linear
from idefics.quantization.kernels import int4_pack, int4_unpack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU")


@pytest.mark.parametrize(("cls", "options"), [(Int8Linear, {}), (Int4Linear, dict(group_size=64))])
def test_kernels_match_dequantised_matmul(cls, options):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, device="cuda")
    layer = cls.from_linear(linear, **options)
    assert getattr(layer, "packed_for", "cuda") == "cuda"
    x = torch.randn(3, 256, device="cuda")
    with torch.no_grad():
        expected = x @ layer.dequantize().T + linear.bias
        torch.testing.assert_close(layer(x), expected, atol=0.05, rtol=0.02)
    q = torch.randint(0, 16, (128, 256), device="cuda")
    assert torch.equal(int4_unpack(int4_pack(q), 128, 256), q.to(torch.uint8))


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantised_decode_with_cuda_graphs_and_compile(scheme, tmp_path):
    folder = save_reference(reference_model(NAME, **WIDE), tmp_path, name=NAME, max_shard_size="1MB")
    # float32 around the quantised layers (their kernels take bf16 activations anyway): compiled and eager agree.
    model = IdeficsForVisionText2Text.from_pretrained(folder, quantize=scheme, group_size=32, device="cuda")
    ids, am, pv, iam = make_batch(config_dict(NAME, **WIDE))
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)
    batch = {k: v.cuda() for k, v in batch.items()}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = model.generate(**batch, **kwargs)
    for mode in (dict(cuda_graphs=True), dict(compile=True)):
        assert torch.equal(model.generate(**batch, **mode, **kwargs), eager), mode
    model.save_pretrained(tmp_path / "saved")
    loaded = IdeficsForVisionText2Text.from_pretrained(tmp_path / "saved", device="cuda")
    assert torch.equal(loaded.generate(**batch, **kwargs), eager)
