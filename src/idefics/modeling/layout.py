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

Values, shapes, names and `requires_grad` are unchanged (checkpoints save as before, training still uses the Linear
weights); a module whose weights were replaced since (`.to()`, `load_state_dict(assign=True)`) falls back to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pack(linears: list[nn.Linear]) -> torch.Tensor:
    """Pack bias-free Linear weights into one (sum of out, in) weight; the Linear weights become views of it."""
    packed = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    start = 0
    for lin in linears:
        out = lin.weight.shape[0]
        lin.weight.data = packed[start : start + out]  # (out, in) view
        start += out
    return packed


def fused_weight(packed: torch.Tensor | None, first: nn.Linear) -> torch.Tensor | None:
    """The packed weight, if it may be used now: no gradient recorded and still shared with the Linear weights.
    Compiled code cannot trace the pointer check; `use_decode_layout` drops stale packs before every generation."""
    if packed is None or torch.is_grad_enabled():
        return None
    if not torch.compiler.is_compiling() and first.weight.data_ptr() != packed.data_ptr():
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


def dense(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a bias-free (out, in) weight; through oneDNN on a float32 CPU tensor with no gradient."""
    if (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _onednn()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x), with `dense`'s fast path for a plain bias-free nn.Linear without hooks (adapters such as LoRA
    wrappers, and hooked modules, are called as usual)."""
    if type(linear) is nn.Linear and linear.bias is None and not (linear._forward_hooks or linear._forward_pre_hooks):
        return dense(x, linear.weight)
    return linear(x)


def _groups(model: nn.Module):
    """(module, attribute of its packed weight, the Linears packed into it) for every packable group."""
    backbone = model.model
    for layer in backbone.layers:
        attn = layer.self_attn
        yield attn, "qkv_packed", [attn.q_proj, attn.k_proj, attn.v_proj]
    for layer in [*backbone.layers, *backbone.gated_cross_attn_layers]:
        yield layer.mlp, "gate_up_packed", [layer.mlp.gate_proj, layer.mlp.up_proj]


def use_decode_layout(model: nn.Module) -> bool:
    """Pack a CUDA model's or a float32 CPU model's decoder weights (and re-stride the CPU LM head), once; on later
    calls, drop packed weights whose Linears were replaced since. Returns whether it packed now."""
    if getattr(model, "_decode_layout", False):
        for module, attr, linears in _groups(model):
            packed = getattr(module, attr)
            if packed is not None and linears[0].weight.data_ptr() != packed.data_ptr():
                setattr(module, attr, None)
        return False
    lm_head = model.lm_head
    device = lm_head.weight.device.type
    cpu = device == "cpu" and lm_head.weight.dtype == torch.float32
    if not (cpu or device == "cuda"):
        return False
    model._decode_layout = True
    with torch.no_grad():
        for module, attr, linears in _groups(model):
            setattr(module, attr, _pack(linears))
        if cpu and lm_head.weight is not model.model.embed_tokens.weight:  # a tied table keeps its row layout
            lm_head.weight.data = lm_head.weight.data.T.contiguous().T
    return True
