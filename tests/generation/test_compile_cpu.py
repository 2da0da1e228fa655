"""compile=True on CPU through Inductor with our options (frozen weights, C++ wrapper, autotuned GEMMs): the same
logits as eager, float32 and int8, and a recompile when weights the frozen graph baked in change in place."""

import pytest
import torch
from reference import config_dict, make_batch

import idefics
from idefics.generation import compiling, decode_step, prefill, step


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # no compiled entries from earlier tests, so the recompile limit cannot send us to eager
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def teacher_forced_logits(model, batch, *, compile: bool, steps: int = 4) -> torch.Tensor:
    """Logits (steps + 1, b, v) of prefill then `steps` decode steps fed the same tokens (1, 2, 3, ...)."""
    ids, mask, pixels, image_mask = batch
    with torch.inference_mode():
        logits, state = prefill(model, ids, attention_mask=mask, pixel_values=pixels, image_attention_mask=image_mask,
                                capacity=ids.shape[1] + steps, compile=compile)  # fmt: skip
        out = [logits]
        for i in range(steps):
            out.append(decode_step(model, torch.full((ids.shape[0],), i + 1), state))
    return torch.stack(out)


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_inductor_step_equals_eager(quantize, reference_checkpoints, fresh_dynamo):
    folder = reference_checkpoints("resampler_qk_interval2")[1]
    model = idefics.IdeficsForVisionText2Text.from_pretrained(folder, quantize=quantize)
    batch = make_batch(config_dict("resampler_qk_interval2"))
    eager = teacher_forced_logits(model, batch, compile=False)
    compiled = teacher_forced_logits(model, batch, compile=True)
    assert compiled_graphs() >= 1, "the decode step was not compiled"
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3 if quantize else 1e-4)


def test_frozen_weights_recompile_after_in_place_update(reference_checkpoints, fresh_dynamo, monkeypatch):
    """Freezing bakes the weights into the graph: after an in-place update the next request must not run the old
    values. (Freezing alone, to keep the two compiles short; the mechanism is the same with every option.)"""
    monkeypatch.setattr(compiling, "CPU_OPTIONS", {"freezing": True})
    model = idefics.IdeficsForVisionText2Text.from_pretrained(reference_checkpoints("resampler_qk_interval2")[1])
    batch = make_batch(config_dict("resampler_qk_interval2"))
    teacher_forced_logits(model, batch, compile=True, steps=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(1.5)
    eager = teacher_forced_logits(model, batch, compile=False, steps=2)
    compiled = teacher_forced_logits(model, batch, compile=True, steps=2)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


def test_fingerprint_follows_in_place_updates_and_swapped_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    before = compiling.FrozenWeights.fingerprint(model)
    assert compiling.FrozenWeights.fingerprint(model) == before
    with torch.no_grad():
        model[1].weight.add_(1)
    after_update = compiling.FrozenWeights.fingerprint(model)
    assert after_update != before
    model[0].weight.data = torch.zeros(4, 4)
    assert compiling.FrozenWeights.fingerprint(model) != after_update


def test_cpu_options_can_be_turned_off(monkeypatch):
    assert compiling.compile_options(torch.device("cpu"))["freezing"]
    assert compiling.compile_options(torch.device("cuda")) == {}
    monkeypatch.setenv("IDEFICS_COMPILE_OPTIONS", "none")
    assert compiling.compile_options(torch.device("cpu")) == {}


def test_one_compiled_step_for_every_length(reference_checkpoints, fresh_dynamo, monkeypatch):
    """On CPU the compiled step attends over the filled positions only, a dynamic length: one graph serves every
    step of a request (without the dynamic mark, the second step would compile again)."""

    eager_compiled = torch.compile(step.static_step, backend="eager", fullgraph=True)
    monkeypatch.setitem(compiling._COMPILED, (step.static_step, "cpu"), eager_compiled)
    model = idefics.IdeficsForVisionText2Text.from_pretrained(reference_checkpoints("resampler_qk_interval2")[1])
    batch = make_batch(config_dict("resampler_qk_interval2"))
    eager = teacher_forced_logits(model, batch, compile=False, steps=6)
    compiled = teacher_forced_logits(model, batch, compile=True, steps=6)
    assert compiled_graphs() == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
