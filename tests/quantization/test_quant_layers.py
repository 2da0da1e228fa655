"""The quantised layers on their own: quantise -> dequantise error bounds per scheme, the kernels against
dequantise-then-matmul, the stored layouts, the backward of a frozen quantised weight, and the errors."""

import pytest
import torch
from torch import nn

from idefics.modeling.embeddings import IdeficsDecoupledLinear
from idefics.quantization import Int4Linear, Int8Head, Int8Linear, Nf4Linear, QuantizationConfig, QuantizationError
from idefics.quantization.kernels import int4_pack, int4_unpack, nf4_code, pack_nibbles, unpack_nibbles
from idefics.quantization.swap import check_device

# The NF4 table as printed in the QLoRA paper's appendix (Dettmers et al. 2023).
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
SCHEMES = {
    "int8": (Int8Linear, {}),
    "int4": (Int4Linear, dict(group_size=32)),
    "nf4": (Nf4Linear, dict(block_size=64, double_quant=True)),
    "nf4-single": (Nf4Linear, dict(block_size=64, double_quant=False)),
}
# Relative Frobenius error of the dequantised weight on Gaussian weights (measured: 0.0064, 0.079, 0.093, 0.093).
BOUNDS = {"int8": 0.008, "int4": 0.09, "nf4": 0.10, "nf4-single": 0.10}


def gaussian_linear(n: int, k: int, *, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, k**-0.5)
    return linear


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(64, 128), (48, 96)])  # (48, 96): int4 runs without the kernel (48 rows)
def test_dequantised_weight_within_bound(scheme, shape):
    cls, options = SCHEMES[scheme]
    linear = gaussian_linear(*shape)
    layer = cls.from_linear(linear, **options)
    w = linear.weight.detach()
    error = (layer.dequantize() - w).norm() / w.norm()
    assert 0 < error < BOUNDS[scheme]
    if scheme == "int8":  # symmetric per row: no value is off by more than half a step
        step = w.abs().amax(dim=1, keepdim=True) / 127
        assert ((layer.dequantize() - w).abs() <= 0.51 * step + 1e-6).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_matches_dequantised_matmul_and_backward(scheme):
    cls, options = SCHEMES[scheme]
    linear = gaussian_linear(64, 128)
    layer = cls.from_linear(linear, **options)
    x = torch.randn(2, 5, 128)
    expected = x @ layer.dequantize().T + linear.bias.detach()  # (2, 5, 64)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 5, 64) and y.dtype == x.dtype
    torch.testing.assert_close(y, expected, atol=0.03, rtol=0.02)  # the kernels take bf16 activations
    x.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    dy = 2 * (layer(x.detach()))  # (2, 5, 64)
    torch.testing.assert_close(x.grad, dy @ layer.dequantize(), atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in layer.parameters())


def test_int4_uses_the_kernel_where_it_fits_and_stores_the_plain_layout():
    fits = Int4Linear.from_linear(gaussian_linear(64, 128), group_size=32)
    assert fits.packed
    unfit = Int4Linear.from_linear(gaussian_linear(48, 96), group_size=16)  # group 16: no kernel, dequantises
    assert not unfit.packed
    state = fits.state_dict()
    assert state["weight"].shape == (64, 64) and state["weight"].dtype == torch.uint8
    assert state["weight_scale_zero"].shape == (4, 64, 2)
    fresh = Int4Linear(128, 64, bias=True, group_size=32)
    fresh.load_state_dict(state, assign=True)
    assert not fresh.packed
    torch.testing.assert_close(fresh.dequantize(), fits.dequantize(), atol=0, rtol=0)
    fresh.finish_loading()
    assert fresh.packed and torch.equal(fresh.weight, fits.weight)


def test_int4_layouts_round_trip():
    q = torch.randint(0, 16, (48, 160), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q.to(torch.uint8))
    assert torch.equal(int4_unpack(int4_pack(q), 48, 160), q.to(torch.uint8))


def test_nf4_code_is_the_published_table():
    torch.testing.assert_close(nf4_code(), torch.tensor(NF4_PUBLISHED), atol=1e-6, rtol=0)


def test_nf4_double_quant_stores_less_and_stays_close():
    linear = gaussian_linear(256, 256, bias=False)
    single = Nf4Linear.from_linear(linear, block_size=64, double_quant=False)
    double = Nf4Linear.from_linear(linear, block_size=64, double_quant=True)
    assert double.weight_bytes() < single.weight_bytes()
    assert (double.absmax() - single.absmax()).abs().max() < 0.01 * single.absmax().max()
    # An odd-sized weight fills its last block with padding that is never read back.
    odd = Nf4Linear.from_linear(gaussian_linear(7, 9, bias=False), block_size=64, double_quant=True)
    assert odd.dequantize().shape == (7, 9)


@pytest.mark.parametrize("block_size", [1, 3, 63, 64, 100])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_any_block_size_fits_any_layer(block_size, double_quant):
    """Blocks run over the flattened weight: an odd block size on an odd number of blocks ends in one padding code
    (it was a shape error), and every layer quantises, stores and computes at any block size."""
    for n, k in [(7, 9), (5, 24), (33, 40)]:
        linear = gaussian_linear(n, k)
        layer = Nf4Linear.from_linear(linear, block_size=block_size, double_quant=double_quant)
        blocks = -(-n * k // block_size)
        assert layer.weight.shape == (-(-blocks * block_size // 2),)
        w = linear.weight.detach()
        assert (layer.dequantize() - w).norm() / w.norm() < (0.01 if block_size == 1 else BOUNDS["nf4"])
        x = torch.randn(3, k)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ layer.dequantize().T + linear.bias, rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(QuantizationError, match="unknown quantisation scheme 'int3'"):
        QuantizationConfig("int3")
    with pytest.raises(QuantizationError, match="group_size must be a positive integer"):
        QuantizationConfig("int4", group_size=0)
    with pytest.raises(QuantizationError, match=r"overrides\['a.b'\] must set a scheme \(int8, int4, nf4 or 'full'\)"):
        QuantizationConfig("int4", overrides={"a.b": {"scheme": "int2"}})
    with pytest.raises(QuantizationError, match=r"overrides\['a.b'\] must set a scheme .* got \{'bits': 4\}"):
        QuantizationConfig("int4", overrides={"a.b": {"bits": 4}})
    with pytest.raises(QuantizationError, match="group_size must be a positive integer, got 0"):
        QuantizationConfig("int4", overrides={"a.b": {"scheme": "int4", "group_size": 0}})
    with pytest.raises(QuantizationError, match="strict must be true or false"):
        QuantizationConfig("int4", strict="yes")
    with pytest.raises(QuantizationError, match="int8 quantisation runs on cpu or cuda, not on mps"):
        check_device(QuantizationConfig("int8"), "mps")
    with pytest.raises(QuantizationError, match="only checkpoints quantised by idefics"):
        QuantizationConfig.from_dict({"quant_method": "bitsandbytes", "load_in_4bit": True})


def test_int8_head_close_to_the_decoupled_head():
    """The vocabulary rows in int8 (cosine >= 0.9999 per row of logits), the 2 additional rows in full precision."""
    torch.manual_seed(0)
    head = IdeficsDecoupledLinear(64, 1000, 2, frozen=True)
    with torch.no_grad():
        head.weight.normal_(0, 0.02)
        head.additional_fc.weight.normal_(0, 0.02)
    quantised = Int8Head.from_head(head)
    assert quantised.additional_fc is head.additional_fc and quantised.weight.dtype == torch.int8
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected, got = head(x), quantised(x)  # (3, 5, 1002)
    assert got.shape == expected.shape and got.dtype == x.dtype
    cosine = torch.nn.functional.cosine_similarity(got[..., :1000], expected[..., :1000], dim=-1)
    assert cosine.min() >= 0.9999
    torch.testing.assert_close(got[..., 1000:], expected[..., 1000:], atol=1e-6, rtol=1e-5)  # full precision
    assert set(quantised.state_dict()) == {"weight", "weight_scale", "additional_fc.weight"}


@pytest.mark.parametrize("in_features", [8, 24, 40, 48])
@pytest.mark.parametrize("rows", [1, 5, 100])
def test_int8_any_width(in_features, rows):
    """torch's int8 CPU kernel reads the input width in vectors of 16 (other widths crashed or went wrong): those
    layers dequantise instead, and every width gives the dequantised product."""
    torch.manual_seed(in_features)
    layer = Int8Linear.from_linear(nn.Linear(in_features, 24, bias=True))
    x = torch.randn(rows, 3, in_features)
    expected = x @ layer.dequantize().T + layer.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
