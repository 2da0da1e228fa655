"""Shared pieces of the benchmarks: configs, inputs, timing, the weight-streaming bound."""

from __future__ import annotations

import statistics
import time

import torch


def bench_config(preset: str) -> dict:
    """transformers IdeficsConfig kwargs. `bench` is the issue's CPU config; the others check other shapes."""
    vision = dict(embed_dim=384, image_size=224, patch_size=14, num_hidden_layers=6, num_attention_heads=6,
                  intermediate_size=1536)  # fmt: skip
    perceiver = dict(use_resampler=True, resampler_n_latents=64, resampler_depth=2, resampler_n_heads=8,
                     resampler_head_dim=64, qk_layer_norms_perceiver=True)  # fmt: skip
    base = dict(vocab_size=32000, additional_vocab_size=2, hidden_size=512, intermediate_size=1376,
                num_hidden_layers=8, num_attention_heads=8, cross_layer_interval=1, use_resampler=True,
                qk_layer_norms=True, alpha_initializer="ones", alpha_type="float", vision_config=vision,
                perceiver_config=perceiver, freeze_text_layers=False, freeze_vision_layers=False)  # fmt: skip
    presets = {
        "bench": base,
        "wide": base
        | dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=4,
            num_attention_heads=16,
            cross_layer_interval=2,
        ),  # fmt: skip
        "deep": base
        | dict(
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=16,
            num_attention_heads=6,
            cross_layer_interval=4,
            use_resampler=False,
        ),  # fmt: skip
        "tiny": base
        | dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vision_config=vision
            | dict(embed_dim=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28),
            perceiver_config=perceiver | dict(resampler_n_latents=4, resampler_n_heads=2, resampler_head_dim=8),
        ),  # fmt: skip
    }
    return presets[preset]


def idefics_9b_config() -> dict:
    vision = dict(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14, num_attention_heads=16,
                  num_hidden_layers=32)  # fmt: skip
    perceiver = dict(use_resampler=True, qk_layer_norms_perceiver=True, resampler_depth=6, resampler_head_dim=96,
                     resampler_n_heads=16, resampler_n_latents=64)  # fmt: skip
    return dict(vocab_size=32000, additional_vocab_size=2, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, cross_layer_interval=4, use_resampler=True,
                qk_layer_norms=True, alpha_initializer="ones", alpha_type="float", vision_config=vision,
                perceiver_config=perceiver, freeze_text_layers=False, freeze_vision_layers=False)  # fmt: skip


def make_inputs(cfg: dict, *, batch: int, prompt: int, device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """A left-padded batch with one image per row, every token after the image attending to it."""
    g = torch.Generator().manual_seed(seed)
    r = cfg["vision_config"]["image_size"]
    ids = torch.randint(3, cfg["vocab_size"], (batch, prompt), generator=g)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    for row in range(1, batch):
        mask[row, : row % 4] = 0  # some rows padded
    ids[mask == 0] = 0
    image_mask = torch.zeros(batch, prompt, 1, dtype=torch.long)
    image_mask[:, 4:] = 1
    pixels = torch.randn(batch, 1, 3, r, r, generator=g)
    out = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype), image_attention_mask=image_mask)
    return {k: v.to(device) for k, v in out.items()}


def timed(fn, *, repeat: int, sync=lambda: None) -> float:
    """Median wall time of fn() over `repeat` runs, after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every decoder/gated/head weight except the image-side K/V
    projections (cached per request), the vision tower and the perceiver; one embedding row is negligible."""
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(("model.vision_model", "model.perceiver_resampler", "model.embed_tokens")):
            continue
        if ".cross_attn.k_proj." in name or ".cross_attn.v_proj." in name:
            continue
        total += p.numel() * p.element_size()
    return total


def matvec_bandwidth(nbytes: int, *, dtype=torch.float32, device="cpu", repeat: int = 20, sync=lambda: None) -> float:
    """Bytes/s of x @ W.T for one vector against a weight matrix of `nbytes` (the streaming bound's denominator)."""
    cols = 1024
    rows = max(1, nbytes // (cols * torch.tensor([], dtype=dtype).element_size()))
    w = torch.randn(rows, cols, device=device, dtype=dtype)
    x = torch.randn(1, cols, device=device, dtype=dtype)
    seconds = timed(lambda: x @ w.T, repeat=repeat, sync=sync)
    return w.numel() * w.element_size() / seconds


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Weights with realistic scale (the reference init leaves gates at 0 and many weights at 0 or 1)."""
    for name, p in model.named_parameters():
        if "alpha" in name:
            p.fill_(0.5)
        elif p.ndim > 1:
            p.normal_(0, p.shape[-1] ** -0.5)


def measure(generators: dict, *, n: int, repeat: int, sync=lambda: None) -> dict[str, tuple[float, float]]:
    """Median seconds of generate(1) and generate(n) per implementation, interleaved round by round so that
    drifts of the machine hit both sides alike."""
    times = {name: ([], []) for name in generators}
    for gen in generators.values():  # warm-up
        gen(1), gen(n)
    for _ in range(repeat):
        for name, gen in generators.items():
            for k, bucket in zip((1, n), times[name], strict=True):
                start = time.perf_counter()
                gen(k)
                sync()
                bucket.append(time.perf_counter() - start)
    return {name: (statistics.median(t1), statistics.median(tn)) for name, (t1, tn) in times.items()}


def ours_sharing(ref: torch.nn.Module, device: str):
    """Our model on the reference's own weight tensors (no second copy), rotary buffers built on `device`."""
    import idefics

    with torch.device("meta"):
        ours = idefics.IdeficsForVisionText2Text(idefics.IdeficsConfig.from_dict(ref.config.to_dict()))
    ours.load_state_dict(ref.state_dict(), assign=True)
    ours.model.rotary_emb.reset_buffers(device)
    return ours
