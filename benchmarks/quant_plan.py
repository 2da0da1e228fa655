"""What a layer int4's group sizes cannot take should become (`idefics/quantization/plan.py`): int8 or full precision.

    python benchmarks/quant_plan.py [--threads 1] [--rounds 7] [--clock cpu|wall]

1. One layer, side by side in one process: float32 `F.linear` against int8 through its kernel (in features a
   multiple of 16) or dequantising (others), at m = 1 (decode) and 64 rows; the relative error of the output.
2. The demo model with `--quantize int4` at group 128 (its 336-wide down_proj layers fit no int4 group size), the
   candidates for those layers set by hand through `QuantizationConfig.overrides`: int8 (the rule) or full precision;
   beside them int4 at group 16 (divides every width; no kernel), int8 and fp32. Weight bytes, decode tokens/s
   (batch 1, 32 new tokens, medians of interleaved rounds) and exact answers on 96 fresh images.

Times are CPU time (`time.process_time`) by default: on a shared machine wall time swings 10x from run to run,
while the CPU time a computation takes barely moves (`--clock wall` for wall time on an idle one).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

import idefics
from idefics import IdeficsForVisionText2Text, IdeficsProcessor
from idefics.demo.build import EVAL_SIZES
from idefics.demo.evaluate import accuracy
from idefics.demo.world import random_scene, render
from idefics.quantization import Int8Linear, QuantizationConfig, weight_bytes

SHAPES = [(128, 336), (1344, 336), (4096, 2736), (256, 72), (1024, 200), (4096, 1000)]  # (n, k)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def interleaved_ms(fns: list, x: torch.Tensor, *, reps: int, rounds: int) -> list[float]:
    """Median ms per call of each of `fns`, timed in turn within every round (a busy machine slows them alike)."""
    runs: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            for _ in range(5):
                fn(x)
        for _ in range(rounds):
            for fn, times in zip(fns, runs, strict=True):
                start = clock()
                for _ in range(reps):
                    fn(x)
                times.append((clock() - start) / reps * 1e3)
    return [statistics.median(times) for times in runs]


def layers(rounds: int) -> None:
    print("n x k, rows: fp32 ms, int8 ms, int8 / fp32, int8 relative error (int8 path)")
    torch.manual_seed(0)
    for n, k in SHAPES:
        linear = nn.Linear(k, n, bias=False)
        int8 = Int8Linear.from_linear(linear)
        for m in (1, 64):
            x = torch.randn(m, k)
            with torch.no_grad():
                ref = linear(x)
                error = ((int8(x) - ref).norm() / ref.norm()).item()
            fp32, q = interleaved_ms([linear, int8], x, reps=100 if m == 1 else 20, rounds=rounds)
            path = "kernel" if k % 16 == 0 else "dequantised"
            print(f"{n} x {k}, m={m}: {fp32:.4f}, {q:.4f}, {q / fp32:.2f}x, {error:.1e} ({path})")


def demo(rounds: int) -> None:
    processor = IdeficsProcessor.from_pretrained(idefics.DEMO_MODEL)
    base = IdeficsForVisionText2Text.from_pretrained(idefics.DEMO_MODEL, quantize="int4")
    wide = {name: {"scheme": "full"} for name, s in base.quantization_config.overrides.items() if s["scheme"] == "int8"}
    overrides = {**base.quantization_config.overrides, **wide}
    variants = {
        "int4 g128, 336-wide int8 (the rule)": dict(quantize="int4"),
        "int4 g128, 336-wide full precision": dict(quantize=QuantizationConfig("int4", overrides=overrides)),
        "int4 g16 (no kernel)": dict(quantize="int4", group_size=16),
        "int8": dict(quantize="int8"),
        "fp32": {},
    }
    load = IdeficsForVisionText2Text.from_pretrained
    models = {name: load(idefics.DEMO_MODEL, **options) for name, options in variants.items()}
    scene = random_scene(random.Random(0), size=200)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": render(scene)}, {"type": "text", "text": "Describe"}]}]
    )
    inputs = processor(prompt, add_end_of_utterance_token=False)
    options = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.generate(**inputs, **options)
        for _ in range(rounds):
            for name, model in models.items():
                start = clock()
                model.generate(**inputs, **options)
                times[name].append(clock() - start)
    print("\nvariant: weight bytes, tokens/s (prompt + 32 new, batch 1), exact answers on 96 fresh images")
    for name, model in models.items():
        result = accuracy(model, processor, count=96, seed=2024, sizes=EVAL_SIZES, batch_size=48)
        rate = 32 / statistics.median(times[name])
        print(f"{name}: {weight_bytes(model) / 1e6:.2f} MB, {rate:.1f} tok/s, {result.value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    layers(args.rounds)
    demo(args.rounds)


if __name__ == "__main__":
    main()
