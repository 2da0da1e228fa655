"""Decode speed, ours vs transformers, side by side in one process (CPU, fp32, 2 threads by default).

    python benchmarks/generate.py [--preset bench|wide|deep|tiny] [--threads 2] [--new-tokens 32]
    python benchmarks/generate.py --sweep 8 [--seed 0]   # batch-1 decode on 8 seeded random shapes
    python benchmarks/generate.py --sweep 6 --batch 4    # the same at batch 4
    python benchmarks/generate.py --sweep 6 --int8       # plus int8 eager and compiled, against our fp32

Prints batch-1 decode tokens/s, batch-8 decode throughput, prefill latency, and the fraction of the
weight-streaming bound (weight bytes per decode step / bandwidth of x @ W.T over as many fp32 bytes).
Decode rates are (N - 1) / (time(N new tokens) - time(1 new token)), so prefill is excluded on both sides; prefill is
time(1 new token) at batch 1 (time to first token). Runs alternate between the implementations, medians reported.
`--sweep N` measures batch-1 decode, ours and the reference's, on N seeded random shapes (hidden 256-1024, 2-16
decoder layers, cross-attention interval 1-4, with and without the resampler and the q/k norms) and prints each
ratio and the smallest: a speed-up that holds only on the presets shows up here. `--batch B` decodes B rows (throughput
in tokens/s over all rows); `--int8` adds ours loaded with `quantize="int8"`, eager and `compile=True` (compile time
excluded), and prints their ratios to our fp32.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch
from common import bench_config, decode_weight_bytes, make_inputs, matvec_bandwidth, measure, randomize_
from tqdm import tqdm

import idefics


def build_checkpoint(cfg: dict, folder: Path):
    import transformers

    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**cfg))
    randomize_(model)
    model.save_pretrained(folder, max_shard_size="200MB")


def sweep_configs(count: int, seed: int) -> list[dict]:
    """`count` seeded random decoder shapes on the bench preset's vision tower (head width 64)."""
    rng = random.Random(seed)
    configs = []
    for _ in range(count):
        hidden, layers = rng.choice(range(256, 1025, 64)), rng.randint(2, 16)
        resampler, qk_norms = rng.random() < 0.5, rng.random() < 0.5
        base = bench_config("bench")
        shape = dict(
            hidden_size=hidden,
            intermediate_size=rng.choice(range(2 * hidden, 3 * hidden + 1, 64)),
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            cross_layer_interval=rng.choice([i for i in (1, 2, 3, 4) if layers % i == 0]),  # must divide
            use_resampler=resampler,
            qk_layer_norms=qk_norms,
            perceiver_config=base["perceiver_config"]
            | dict(use_resampler=resampler, qk_layer_norms_perceiver=qk_norms),
        )
        configs.append(base | shape)
    return configs


def decode_rates(impls: dict, cfg: dict, *, prompt: int, n: int, repeat: int, batch: int = 1) -> dict[str, float]:
    """Decode tokens/s (over all `batch` rows) of each implementation: name -> (model, generate kwargs)."""
    inputs = make_inputs(cfg, batch=batch, prompt=prompt)

    def generator(model, extra):
        def generate(k):
            with torch.inference_mode():
                return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, **extra)

        return generate

    times = measure({name: generator(m, extra) for name, (m, extra) in impls.items()}, n=n, repeat=repeat)
    return {name: batch * (n - 1) / (tn - t1) for name, (t1, tn) in times.items()}


def run_sweep(args: argparse.Namespace) -> None:
    import transformers

    rows = []
    for cfg in tqdm(sweep_configs(args.sweep, args.seed), desc="shapes"):
        with tempfile.TemporaryDirectory() as tmp:
            build_checkpoint(cfg, Path(tmp))
            impls = {"ours": (idefics.IdeficsForVisionText2Text.from_pretrained(tmp), {}),
                     "reference": (transformers.IdeficsForVisionText2Text.from_pretrained(tmp).eval(), {})}  # fmt: skip
            if args.int8:
                int8 = idefics.IdeficsForVisionText2Text.from_pretrained(tmp, quantize="int8")
                impls |= {"int8": (int8, {}), "int8 compiled": (int8, {"compile": True})}
        rates = decode_rates(impls, cfg, prompt=args.prompt, n=args.new_tokens, repeat=args.repeat, batch=args.batch)
        rows.append((cfg, rates))
    print(f"\nsweep of {args.sweep} shapes (seed {args.seed}), threads={args.threads}, batch-{args.batch} decode "
          "(fp32 unless int8, CPU)")  # fmt: skip
    int8_header = f"{'int8':>8}{'int8 comp':>10}{'int8/ours':>10}{'comp/ours':>10}" if args.int8 else ""
    print(f"{'hidden':>7}{'ffn':>6}{'layers':>7}{'interval':>9}{'resampler':>10}{'qk norm':>8}"
          f"{'ours tok/s':>11}{'ref tok/s':>10}{'ratio':>7}{int8_header}")  # fmt: skip
    for cfg, r in rows:
        int8_row = ""
        if args.int8:
            int8_row = (f"{r['int8']:8.1f}{r['int8 compiled']:10.1f}{r['int8'] / r['ours']:9.2f}x"
                        f"{r['int8 compiled'] / r['ours']:9.2f}x")  # fmt: skip
        print(f"{cfg['hidden_size']:7}{cfg['intermediate_size']:6}{cfg['num_hidden_layers']:7}"
              f"{cfg['cross_layer_interval']:9}{cfg['use_resampler']!s:>10}{cfg['qk_layer_norms']!s:>8}"
              f"{r['ours']:11.1f}{r['reference']:10.1f}{r['ours'] / r['reference']:6.2f}x{int8_row}")  # fmt: skip
    print(f"smallest ratio ours/ref: {min(r['ours'] / r['reference'] for _, r in rows):.2f}x")
    if args.int8:
        print(f"smallest int8 compiled / ours fp32: {min(r['int8 compiled'] / r['ours'] for _, r in rows):.2f}x, "
              f"int8 eager / ours fp32: {min(r['int8'] / r['ours'] for _, r in rows):.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=["bench", "wide", "deep", "tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="measure ours only")
    parser.add_argument("--sweep", type=int, metavar="N", help="batch-1 decode on N seeded random shapes instead")
    parser.add_argument("--seed", type=int, default=0, help="the sweep's shapes")
    parser.add_argument("--batch", type=int, default=1, help="the sweep's batch size")
    parser.add_argument("--int8", action="store_true", help="the sweep adds int8, eager and compiled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sweep:
        run_sweep(args)
        return
    cfg = bench_config(args.preset)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(cfg, folder)
        impls = {"ours": idefics.IdeficsForVisionText2Text.from_pretrained(folder)}
        if not args.no_reference:
            import transformers

            impls["reference"] = transformers.IdeficsForVisionText2Text.from_pretrained(folder).eval()

    n = args.new_tokens
    results: dict[str, dict[str, float]] = {name: {} for name in impls}
    for b in tqdm((1, 8), desc="batch sizes"):
        inputs = make_inputs(cfg, batch=b, prompt=args.prompt)

        def generator(model, inputs=inputs):
            def generate(k):
                with torch.inference_mode():
                    return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False)

            return generate

        for name, (t1, tn) in measure(
            {name: generator(m) for name, m in impls.items()}, n=n, repeat=args.repeat
        ).items():
            results[name][f"decode_b{b}"] = b * (n - 1) / (tn - t1)
            if b == 1:
                results[name]["prefill_ms"] = 1e3 * t1  # time to the first token: vision, perceiver, prompt

    ours = impls["ours"]
    weight_bytes = decode_weight_bytes(ours)
    bandwidth = matvec_bandwidth(weight_bytes)
    bound = bandwidth / weight_bytes
    print(f"\npreset={args.preset} threads={args.threads} prompt={args.prompt} new_tokens={n} (fp32, CPU)")
    print(f"weights read per decode step: {weight_bytes / 1e6:.1f} MB; x@W.T bandwidth {bandwidth / 1e9:.2f} GB/s; "
          f"bound {bound:.1f} tokens/s")  # fmt: skip
    print(f"{'':12}{'b1 tok/s':>10}{'% bound':>9}{'b8 tok/s':>10}{'prefill ms':>12}")
    for name, r in results.items():
        print(f"{name:12}{r['decode_b1']:10.1f}{100 * r['decode_b1'] / bound:8.0f}%{r['decode_b8']:10.1f}"
              f"{r['prefill_ms']:12.1f}")  # fmt: skip
    if "reference" in results:
        o, r = results["ours"], results["reference"]
        b1, b8 = o["decode_b1"] / r["decode_b1"], o["decode_b8"] / r["decode_b8"]
        prefill = r["prefill_ms"] / o["prefill_ms"]
        print(f"ratio ours/ref: batch-1 decode {b1:.2f}x, batch-8 {b8:.2f}x, prefill {prefill:.2f}x")


if __name__ == "__main__":
    main()
