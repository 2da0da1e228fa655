"""The fine-tuning loop: the update does not depend on how a step is split, resuming is bit-exact, signals save a
checkpoint, half-written checkpoints are ignored, and the outputs load (ours, transformers, PEFT's format)."""

import json
import math
import threading

import pytest
import torch
from finetune_fixture import assert_weights_close
from safetensors.torch import load_file

from idefics import IdeficsForVisionText2Text
from idefics.training import FinetuneConfig, finetune
from idefics.training import checkpoint as ckpt
from idefics.training.sampler import BatchPlan
from idefics.training.schedule import warmup_cosine

LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets="q_proj,v_proj,o_proj")


def run(env, output, *, stop_at=None, **options):
    model_dir, train, _ = env
    options = {"max_length": 64, "lr": 1e-3, "warmup": 1, **options}
    stop = threading.Event()
    on_step = (lambda row: stop.set() if row["step"] == stop_at else None) if stop_at else None
    return finetune(FinetuneConfig(model=str(model_dir), data=str(train), output=str(output), **options),
                    stop=stop, on_step=on_step)  # fmt: skip


def weights(output, *, full: bool) -> dict[str, torch.Tensor]:
    return load_file(output / ("model.safetensors" if full else "adapter_model.safetensors"))


@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_accumulation_split_gives_the_same_update(finetune_env, tmp_path, full):
    # lr 1e-4: Adam's first step moves each weight by about lr * sign(gradient), and by less where the gradient is
    # near eps; there fp32 rounding of the summed gradient shows up, at most ~lr * 1e-2.
    opts = dict(max_steps=2, full=full, lr=1e-4, **({} if full else LORA))
    a = run(finetune_env, tmp_path / "b4", batch_size=4, grad_accum=1, **opts)
    b = run(finetune_env, tmp_path / "b1", batch_size=1, grad_accum=4, **opts)
    assert a.losses == pytest.approx(b.losses, abs=1e-6)
    assert_weights_close(weights(tmp_path / "b4", full=full), weights(tmp_path / "b1", full=full), 1e-6)
    base = load_file(finetune_env[0] / "model.safetensors")
    trained = weights(tmp_path / "b4", full=full)
    if full:  # the step really changed the weights
        assert any(not torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_resume_is_bit_exact(finetune_env, tmp_path, full):
    # LoRA dropout and shuffled epochs (12 rows, 4 per step) exercise the RNG and data position.
    opts = dict(max_steps=6, batch_size=2, grad_accum=2, full=full, seed=5, eval_data=str(finetune_env[2]))
    opts |= {} if full else {**LORA, "lora_dropout": 0.2, "use_rslora": True}
    whole = run(finetune_env, tmp_path / "whole", **opts)
    first = run(finetune_env, tmp_path / "split", stop_at=3, **opts)
    assert first.stopped and first.step == 3 and first.checkpoint.name == "checkpoint-3"
    assert ckpt.latest(tmp_path / "split") == first.checkpoint
    second = run(finetune_env, tmp_path / "split", resume=True, **opts)
    assert not second.stopped and second.step == 6
    assert first.losses + second.losses == whole.losses  # exactly
    a, b = weights(tmp_path / "whole", full=full), weights(tmp_path / "split", full=full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == whole.losses
    assert "eval_loss" in rows[-1] and second.eval_loss == whole.eval_loss


def test_outputs_metrics_curve_and_loading(finetune_env, tmp_path):
    out = tmp_path / "out"
    result = run(finetune_env, out, max_steps=3, batch_size=2, save_every=1, keep=2, eval_data=str(finetune_env[2]),
                 eval_every=2, **LORA)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"step", "loss", "lr", "tokens", "label_tokens", "grad_norm"} <= row.keys()
        assert math.isfinite(row["loss"]) and row["tokens"] > row["label_tokens"] > 0
    assert "eval_loss" in rows[1] and "eval_loss" in rows[2] and "eval_loss" not in rows[0]
    assert (out / "loss.png").stat().st_size > 1000
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]  # keep=2, not final
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    for name in ("tokenizer.json", "preprocessor_config.json", "finetune_config.json"):
        assert (out / name).is_file()
    model = IdeficsForVisionText2Text.from_pretrained(finetune_env[0], adapter=out)
    assert model.adapter_config is not None and result.step == 3


def test_full_output_loads_in_transformers(finetune_env, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    run(finetune_env, out, max_steps=2, batch_size=2, full=True)
    ours = IdeficsForVisionText2Text.from_pretrained(out)
    # alpha_initializer "normal" with a float alpha raises TypeError in the reference's constructor (see README)
    ref_config = transformers.IdeficsConfig.from_pretrained(out, alpha_initializer="zeros")
    ref = transformers.IdeficsForVisionText2Text.from_pretrained(out, config=ref_config).eval()
    ids = torch.tensor([[1, 5, 9, 1000, 1001, 1000, 33, 1002]])
    images = torch.randn(1, 1, 3, 28, 28)
    mask = torch.zeros(1, 8, 1, dtype=torch.long)
    mask[0, 4:, 0] = 1
    with torch.no_grad():
        a = ours(ids, pixel_values=images, image_attention_mask=mask).logits
        b = ref(input_ids=ids, pixel_values=images, image_attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", False), (".checkpoint-12.partial", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / ckpt.MARKER).write_text("")
    assert ckpt.latest(tmp_path) == tmp_path / "checkpoint-2"
    assert ckpt.latest(tmp_path / "missing") is None


def test_refuses_to_overwrite_an_earlier_run(finetune_env, tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / ckpt.MARKER).write_text("")
    with pytest.raises(FileExistsError, match="--resume"):
        run(finetune_env, tmp_path, max_steps=1)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run(finetune_env, tmp_path / "o", max_steps=1, resume=str(tmp_path / "nothing"))


def test_batch_plan_is_the_same_rows_whatever_the_split():
    one = BatchPlan(10, batch_size=1, grad_accum=4, seed=3)
    two = [BatchPlan(10, batch_size=2, grad_accum=1, world_size=2, rank=r, seed=3) for r in range(2)]
    for step in range(6):  # past an epoch boundary: the last step of an epoch tops up from its start
        rows = sorted(i for mb in one.micro_batches(step) for i in mb)
        assert rows == sorted(i for plan in two for mb in plan.micro_batches(step) for i in mb)
        assert len(set(one.step_rows(step))) == 4
    epoch0 = [i for step in range(3) for i in one.step_rows(step)]
    assert set(epoch0) == set(range(10))
    assert one.permutation(0) != one.permutation(1)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup=3, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 7)) for k in range(1, 7)])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_gradient_checkpointing_and_epochs(finetune_env, tmp_path):
    """Recomputing layers in the backward changes no number; --epochs 1 with 12 rows in steps of 4 is 3 steps."""
    opts = dict(epochs=1, batch_size=2, grad_accum=2, full=True)
    plain = run(finetune_env, tmp_path / "plain", **opts)
    recomputed = run(finetune_env, tmp_path / "ckpt", gradient_checkpointing=True, **opts)
    assert plain.step == 3 and plain.losses == pytest.approx(recomputed.losses, abs=1e-6)


def test_bf16_trains_float32_master_weights_over_a_bf16_base(finetune_env, tmp_path, monkeypatch):
    from idefics.training import loop

    built = []
    monkeypatch.setattr(loop, "build_model", lambda *a, build=loop.build_model: built.append(build(*a)) or built[-1])
    result = run(finetune_env, tmp_path / "out", max_steps=2, batch_size=2, bf16=True, **LORA)
    model = built[0]
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    assert all(math.isfinite(loss) for loss in result.losses)
    assert load_file(tmp_path / "out" / "adapter_model.safetensors")  # the adapter is written (float32)


def test_compiled_layers_give_the_same_losses(finetune_env, tmp_path, monkeypatch):
    """--compile: every layer goes through torch.compile and the numbers do not move. The graphs run through
    aot_eager here (dynamo's capture and AOT autograd, eager kernels): inductor's C++ build takes minutes on 2 cores
    and was checked on a GPU (BENCHMARKS.md)."""
    compiled = []

    def compile_with_aot_eager(module, **kwargs):
        compiled.append(module)
        original_compile(module, backend="aot_eager", **kwargs)

    original_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_aot_eager)
    opts = dict(max_steps=2, batch_size=2, gradient_checkpointing=True, **LORA)
    eager = run(finetune_env, tmp_path / "eager", **opts)
    torch._dynamo.reset()
    fused = run(finetune_env, tmp_path / "compiled", compile=True, **opts)
    assert len(compiled) == 2 + 4 + 2  # vision, decoder and gated layers of the tiny config
    assert fused.losses == pytest.approx(eager.losses, abs=1e-5)


def test_loss_at_labelled_positions_only_equals_the_full_loss(reference_checkpoints):
    """`return_logits=False` runs the LM head only where a label is; the loss (mean or sum) and its gradient are the
    full-logits loss's."""
    from reference import config_dict, make_batch

    _, folder = reference_checkpoints("resampler_qk_interval2")
    model = IdeficsForVisionText2Text.from_pretrained(folder).train()
    ids, mask, pixels, image_mask = make_batch(config_dict("resampler_qk_interval2"))
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_attention_mask=image_mask)
    for reduction in ("mean", "sum"):
        full = model(**inputs, labels=labels, loss_reduction=reduction)
        model.zero_grad()
        full.loss.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        sparse = model(**inputs, labels=labels, loss_reduction=reduction, return_logits=False)
        sparse.loss.backward()
        assert sparse.logits is None
        torch.testing.assert_close(sparse.loss, full.loss, atol=1e-5, rtol=1e-6)
        for name, grad in expected.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs labels"):
        model(**inputs, return_logits=False)
