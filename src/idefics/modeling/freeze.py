"""The freeze switches of `IdeficsConfig`, with the reference's semantics.

Every module under the frozen root is frozen, except modules of the listed types ("Linear", "LayerNorm",
"Embedding"), whose own parameters stay trainable. The decoupled embedding / LM head keep their extra rows trainable.
"""

from torch import nn

EXCEPTION_TYPES = {"LayerNorm": nn.LayerNorm, "Linear": nn.Linear, "Embedding": nn.Embedding}


def freeze_module(root: nn.Module, exceptions: list[str] | tuple[str, ...] = ()) -> None:
    keep = tuple(EXCEPTION_TYPES[name] for name in exceptions)
    # Parents are visited before children, so the innermost module decides each parameter's flag.
    for module in root.modules():
        module.requires_grad_(bool(keep) and isinstance(module, keep))
