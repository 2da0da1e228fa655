"""Weight layout and matrix products for fast decoding, in this one place.

Decoding multiplies one row per sequence by every weight, so it runs at the speed weights stream from memory. Fewer,
larger matrix-vector products stream faster, so for inference:

- q/k/v of each self-attention and gate/up of each MLP are packed into one (sum of out, in) weight each, and the
  Linear weights become contiguous row blocks (views) of it; the modules use the packed weight while no gradient is
  recorded (`fused_weight`).
- On a float32 CPU model, the decoder's matrix products run through oneDNN's matmul (`dense`, `project`) rather than
  MKL's: for one row against the usual (out, in) weights it streams 13-19 GB/s where MKL gets 9-13 (measured here
  with 2 threads: 512x512 8.8 -> 13.5 GB/s, 2752x512 9.1 -> 18.7, 512x1376 13.2 -> 17.5), and it is faster at 8 and 64
  rows too. The LM head is the exception: its weight is re-strided into a contiguous (in, out) matrix, for which MKL
  streams 19.7 GB/s (oneDNN 15.5).

- int8 models (`idefics.quantization`) pack the same groups into one int8 kernel call each (`Int8Pack`), on CPU and
  CUDA whatever the activation dtype: 4 kernel calls per decoder layer instead of 7.

Values, shapes, names and `requires_grad` are unchanged (checkpoints save as before, training still uses the Linear
weights); a module whose weights were replaced since (`.to()`, `load_state_dict(assign=True)`) falls back to them.
Only plain nn.Linears (or Int8Linears) are packed or bypassed: a group with an adapter (a LoRA wrapper is an
nn.Linear subclass) or a hook on one of its Linears runs the modules themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantization.int8 import Int8Linear, Int8Pack


def _pack(linears: list[nn.Module]) -> torch.Tensor | Int8Pack:
    """Pack bias-free Linear weights into one (sum of out, in) weight; the Linear weights become views of it."""
    if type(linears[0]) is Int8Linear:
        return Int8Pack.of(linears)
    packed = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    start = 0
    for lin in linears:
        out = lin.weight.shape[0]
        lin.weight.data = packed[start : start + out]  # (out, in) view
        start += out
    return packed


def _plain(linear: nn.Module, kind: type[nn.Module] = nn.Linear) -> bool:
    """A bias-free `kind` itself (not a subclass such as an adapter) without hooks: its forward may be skipped."""
    hooked = linear._forward_hooks or linear._forward_pre_hooks
    return type(linear) is kind and linear.bias is None and not hooked


def _kind(packed: torch.Tensor | Int8Pack) -> type[nn.Module]:
    return Int8Linear if isinstance(packed, Int8Pack) else nn.Linear


def _weight(packed: torch.Tensor | Int8Pack) -> torch.Tensor:
    return packed.weight if isinstance(packed, Int8Pack) else packed


def fused_weight(packed: torch.Tensor | Int8Pack | None, *linears: nn.Module) -> torch.Tensor | Int8Pack | None:
    """The packed weight of `linears`, if it may be used now: no gradient recorded, every Linear still plain and
    still sharing its weight with the pack. Compiled code cannot trace the pointer check; `use_decode_layout` drops
    stale packs before every generation."""
    if packed is None or torch.is_grad_enabled() or not all(_plain(lin, _kind(packed)) for lin in linears):
        return None
    if not torch.compiler.is_compiling() and linears[0].weight.data_ptr() != _weight(packed).data_ptr():
        return None
    return packed


_ONEDNN: list[bool] = []  # probed once: does this torch build have oneDNN's linear op?


def _onednn() -> bool:
    if not _ONEDNN:
        try:
            x = torch.ones(1, 2)
            ok = torch.equal(
                torch.ops.mkldnn._linear_pointwise(x, torch.ones(3, 2), None, "none", [], ""), 2 * x[:, :1].expand(1, 3)
            )
        except (AttributeError, RuntimeError):
            ok = False
        _ONEDNN.append(ok and torch.backends.mkldnn.is_available())
    return _ONEDNN[0]


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """F.linear with oneDNN's matmul in the forward and the backward (dX = dY W, dW = dY^T X), for training."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_linear(dy, weight.t())  # (..., in): dy @ weight; the transposed view costs no copy
        if ctx.needs_input_grad[1]:
            dw = _onednn_linear(dy.reshape(-1, dy.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t())  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dw, db


def dense(x: torch.Tensor, weight: torch.Tensor | Int8Pack, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); through oneDNN on float32 CPU tensors, in training too (its backward as well); an
    `Int8Pack` (from `fused_weight`, no bias) runs its int8 kernel.

    On this project's AMD EPYC machine oneDNN's fp32 matmul runs the training shapes at over twice MKL's speed (one
    thread, 512 rows: 512x512 2.51 -> 1.08 ms, 1376x512 6.57 -> 2.96 ms, the backward's dX alike); torch's own
    fp32 matmul always calls MKL there."""
    if isinstance(weight, Int8Pack):
        return weight(x)  # (..., sum of out)
    if (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and _onednn()
    ):
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        return _OneDnnLinear.apply(x, weight, bias) if needs_grad else _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x), with `dense`'s fast path for an nn.Linear itself without hooks (adapters such as LoRA wrappers,
    and hooked modules, are called as usual)."""
    if type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks):
        return dense(x, linear.weight, linear.bias)
    return linear(x)


def _shares(packed: torch.Tensor | Int8Pack, linear: nn.Module) -> bool:
    return linear.weight.data_ptr() == _weight(packed).data_ptr()


def _groups(model: nn.Module):
    """(module, attribute of its packed weight, the Linears packed into it) for every packable group."""
    backbone = model.model
    for layer in backbone.layers:
        attn = layer.self_attn
        yield attn, "qkv_packed", [attn.q_proj, attn.k_proj, attn.v_proj]
    for layer in [*backbone.layers, *backbone.gated_cross_attn_layers]:
        yield layer.mlp, "gate_up_packed", [layer.mlp.gate_proj, layer.mlp.up_proj]


def use_decode_layout(model: nn.Module) -> bool:
    """Bring a CUDA model's, a float32 CPU model's or an int8 model's decode layout up to date; call it before every
    generation.

    Groups of plain Linears (or plain Int8Linears) get a pack (again, if their weights were replaced since); groups
    where an adapter or a hook now wraps a Linear lose theirs. The CPU LM head is re-strided once. Returns whether
    it packed anything.
    """
    lm_head = model.lm_head
    device = lm_head.weight.device.type
    cpu = device == "cpu" and lm_head.weight.dtype == torch.float32
    packed_now = False
    # Normal tensors even when called under inference_mode (generation): the Linear weights become views of the
    # packs, and inference tensors could not be used by a training step afterwards.
    with torch.inference_mode(False), torch.no_grad():
        for module, attr, linears in _groups(model):
            packed = getattr(module, attr)
            int8 = device in ("cpu", "cuda") and all(_plain(lin, Int8Linear) for lin in linears)
            if not (int8 or ((cpu or device == "cuda") and all(_plain(lin) for lin in linears))):
                setattr(module, attr, None)
            elif packed is None or _kind(packed) is not type(linears[0]) or not _shares(packed, linears[0]):
                setattr(module, attr, _pack(linears))
                packed_now = True
        tied = lm_head.weight is model.model.embed_tokens.weight  # a tied table keeps its row layout
        if cpu and not tied and not getattr(model, "_decode_layout", False):
            lm_head.weight.data = lm_head.weight.data.T.contiguous().T
    if cpu or device == "cuda":
        model._decode_layout = True
    return packed_now
