"""QLoRA: LoRA adapters trained over a frozen NF4 base (bf16 autocast, gradient checkpointing) lower the loss, are
saved in PEFT's format and load with peft onto transformers' full-precision model; and the errors."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from idefics import IdeficsForVisionText2Text
from idefics.adapters import LoraConfig, LoraLinear
from idefics.quantization import Nf4Linear, QuantizationError, QuantizedLinear
from idefics.training import FinetuneConfig, finetune

LORA = dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="q_proj,v_proj,o_proj,down_proj")


def inputs() -> dict:
    ids = torch.tensor([[1, 5, 9, 1000, 1001, 1000, 33, 1002, 40, 41]])
    mask = torch.zeros(1, 10, 1, dtype=torch.long)
    mask[0, 4:, 0] = 1
    return dict(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 28, 28), image_attention_mask=mask)


def test_qlora_lowers_the_loss_and_its_adapter_loads_in_peft(finetune_env, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from idefics.training import loop

    model_dir, train, _ = finetune_env
    built = []
    monkeypatch.setattr(loop, "build_model", lambda *a, build=loop.build_model: built.append(build(*a)) or built[-1])
    out = tmp_path / "out"
    config = FinetuneConfig(model=str(model_dir), data=str(train), output=str(out), quantize="nf4", bf16=True,
                            gradient_checkpointing=True, max_steps=6, batch_size=6, lr=1e-2, max_length=64,
                            **LORA)  # fmt: skip
    result = finetune(config)
    model = built[0]
    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert lora and all(isinstance(m.base_layer, Nf4Linear) for m in lora)
    assert all(not p.requires_grad for m in model.modules() if isinstance(m, QuantizedLinear) for p in m.parameters())
    # 12 rows in batches of 6: steps 1-2 and 5-6 are whole passes over the same rows.
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[4:6]) / 2
    print(f"QLoRA loss: first pass {first:.3f}, third pass {last:.3f}")  # measured 6.88 -> 5.94
    assert all(math.isfinite(loss) for loss in result.losses) and last < 0.9 * first

    batch = inputs()
    ours = IdeficsForVisionText2Text.from_pretrained(model_dir, adapter=out)  # full precision + the adapter
    base = IdeficsForVisionText2Text.from_pretrained(model_dir)
    ref_config = transformers.IdeficsConfig.from_pretrained(model_dir, alpha_initializer="zeros")  # see README
    ref = transformers.IdeficsForVisionText2Text.from_pretrained(model_dir, config=ref_config).eval()
    theirs = peft.PeftModel.from_pretrained(ref, out).eval()
    quantised = IdeficsForVisionText2Text.from_pretrained(model_dir, quantize="nf4", adapter=out)
    with torch.no_grad():
        expected = ours(**batch).logits  # (1, t, v)
        peft_logits = theirs(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                             image_attention_mask=batch["image_attention_mask"]).logits  # fmt: skip
        untrained = base(**batch).logits
        qlora = quantised(**batch).logits
    torch.testing.assert_close(peft_logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, untrained, atol=1e-2)  # the adapter changed the model
    cosine = F.cosine_similarity(qlora.flatten(1), expected.flatten(1)).item()
    # The adapter on the NF4 base it was trained over ~ on the full-precision base (measured 0.91: NF4 alone gives
    # 0.92 on these width-32 noise weights, see test_quant_model.py).
    assert cosine > 0.85


def test_qlora_resumes_bit_exactly(finetune_env, tmp_path):
    """The frozen quantised weights stay out of the checkpoint (they come from the base) and resuming is exact."""
    model_dir, train, _ = finetune_env
    options = dict(model=str(model_dir), data=str(train), output=str(tmp_path / "a"), quantize="nf4", max_steps=3,
                   batch_size=4, lr=1e-3, max_length=64, lora_r=4, lora_targets="q_proj,v_proj")  # fmt: skip
    stop = threading.Event()
    first = finetune(FinetuneConfig(**options), stop=stop, on_step=lambda row: row["step"] == 2 and stop.set())
    resumed = finetune(FinetuneConfig(**options, resume=True))
    straight = finetune(FinetuneConfig(**options | dict(output=str(tmp_path / "b"))))
    assert first.stopped and first.step == 2 and resumed.losses == straight.losses[2:]


def test_errors(finetune_env, tmp_path):
    model_dir, train, _ = finetune_env
    with pytest.raises(ValueError, match="trains LoRA adapters only; drop full"):
        FinetuneConfig(
            model=str(model_dir), data=str(train), output=str(tmp_path), quantize="nf4", full=True
        ).validate()
    with pytest.raises(ValueError, match="quantize must be one of int8, int4, nf4, got 'fp8'"):
        FinetuneConfig(model=str(model_dir), data=str(train), output=str(tmp_path), quantize="fp8").validate()
    model = IdeficsForVisionText2Text.from_pretrained(model_dir, quantize="nf4")
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into quantised weights"):
        model.merge_adapter()
    model.delete_adapter()  # the quantised layers come back as they were
    assert isinstance(model.model.layers[0].self_attn.q_proj, Nf4Linear)
    with pytest.raises(QuantizationError, match="merge=True folds an adapter into full-precision weights"):
        IdeficsForVisionText2Text.from_pretrained(model_dir, quantize="nf4", adapter=tmp_path, merge=True)
    int8 = IdeficsForVisionText2Text.from_pretrained(model_dir, quantize="int8")  # its LM head is int8 too
    for config in (LoraConfig(r=2, target_modules=["lm_head"]),
                   LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])):  # fmt: skip
        with pytest.raises(ValueError, match="'lm_head' is an int8-quantised LM head: LoRA cannot wrap it"):
            int8.add_adapter(config)
