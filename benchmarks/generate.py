"""Decode speed, ours vs transformers, side by side in one process (CPU, fp32, 2 threads by default).

    python benchmarks/generate.py [--preset bench|wide|deep|tiny] [--threads 2] [--new-tokens 32]

Prints batch-1 decode tokens/s, batch-8 decode throughput, prefill latency, and the fraction of the
weight-streaming bound (weight bytes per decode step / bandwidth of x @ W.T over as many fp32 bytes).
Decode rates are (N - 1) / (time(N new tokens) - time(1 new token)), so prefill is excluded on both sides; prefill is
time(1 new token) at batch 1 (time to first token). Runs alternate between the implementations, medians reported.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=["bench", "wide", "deep", "tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="measure ours only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
