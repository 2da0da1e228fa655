"""CUDA graphs for the decode step: capture the fixed-shape step once per request, then replay it per token.

A captured step launches every kernel of the decoder (hundreds at batch 1) with one call, so the GPU no longer waits
on Python. Capture needs every tensor the step reads or writes at a fixed address: the request's static cache, its
masks and positions, and a token buffer that each call copies the new tokens into.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CudaGraphStep:
    """Wraps `step(tokens) -> logits` (fixed shapes, no host syncs) into a captured CUDA graph.

    The warm-up runs (which also trigger torch.compile's compilation) execute the step for real with a zero token;
    they only write this position's keys and values, which the first replay overwrites with the real token's.
    """

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], batch_size: int, device: torch.device, *,
                 warmup: int = 2):  # fmt: skip
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, this one is on {device}")
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # (b,) static input
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(self.tokens)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.tokens)  # (b, v) static output

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the static output
