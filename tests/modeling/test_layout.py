"""The CPU decode layout (packed q/k/v and gate/up, re-strided LM head) changes speed only."""

import pytest
import torch
from reference import config_dict, make_batch

import idefics
from idefics.modeling.layout import dense, use_decode_layout


def test_layout_keeps_values_outputs_and_checkpoints(reference_checkpoints, tmp_path):
    import transformers

    name = "resampler_qk_interval2"
    ref, folder = reference_checkpoints(name)
    model = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, am, pv, iam = make_batch(config_dict(name))
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)
    with torch.no_grad():
        expected = model(**batch).logits
    assert use_decode_layout(model) and not use_decode_layout(model)  # once
    attn = model.model.layers[0].self_attn
    assert attn.qkv_packed is not None and attn.q_proj.weight.data_ptr() == attn.qkv_packed.data_ptr()
    assert not model.lm_head.weight.is_contiguous()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    back = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path, config=ref.config)
    assert all(torch.equal(p, before[k]) for k, p in back.state_dict().items())


def test_layout_training_and_replaced_weights_use_the_linears(reference_checkpoints):
    name = "plain_vector_zeros"
    _, folder = reference_checkpoints(name)
    model = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
    use_decode_layout(model)
    ids, am, pv, iam = make_batch(config_dict(name))
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_attention_mask=iam)
    model.train()
    model(**batch, labels=ids).loss.backward()
    attn = model.model.layers[1].self_attn
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[1].mlp.up_proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        attn.q_proj.weight.data = attn.q_proj.weight.data.clone() * 0.5  # replaced: the packed copy is stale
        changed = model(**batch).logits
    assert not torch.allclose(changed, expected)
    attn.q_proj.weight.data = attn.q_proj.weight.data * 2.0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)


def test_dense_and_project_paths():
    """`dense`/`project` match F.linear on the oneDNN path (no gradient, float32 CPU) and fall back to the module or
    F.linear whenever that path would bypass something: gradients, hooks, adapters that wrap the Linear."""
    from torch import nn

    from idefics.modeling.layout import _onednn, dense, project

    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=False)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, lin.weight)
        torch.testing.assert_close(dense(x, lin.weight), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(project(lin, x), expected, atol=1e-5, rtol=1e-5)
    assert _onednn(), "this torch build has oneDNN; the fast path must be taken"
    out = project(lin, x)  # gradients recorded: the plain module, so backward works
    out.sum().backward()
    assert lin.weight.grad is not None
    calls = []
    lin.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        project(lin, x)
    assert calls == [1]

    class Wrapped(nn.Module):  # what an adapter library puts in place of a Linear
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(48, 80, bias=False)

        def forward(self, x):
            return self.base(x) + 1.0

    wrapped = Wrapped()
    with torch.no_grad():
        torch.testing.assert_close(project(wrapped, x), wrapped.base(x) + 1.0)


@pytest.mark.parametrize("bias", [True, False])
def test_dense_trains_through_onednn_with_linear_gradients(bias):
    """`dense` with gradients (the training path on a float32 CPU): the same output and gradients as F.linear."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w = torch.randn(6, 8, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True) if bias else None
    dy = torch.randn(2, 5, 6, generator=g)
    grads = []
    for fn in (dense, torch.nn.functional.linear):
        y = fn(x, w, b)
        y.backward(dy)
        grads.append((y.detach(), *(t.grad.clone() for t in (x, w, b) if t is not None)))
        for t in (x, w, b):
            if t is not None:
                t.grad = None
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    frozen = dense(x.detach(), w.detach())  # nothing to differentiate: no autograd node
    assert frozen.grad_fn is None
