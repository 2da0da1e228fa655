"""Decode speed on a GPU for an idefics-9b-shaped model (random weights, bf16), ours vs transformers.

    python benchmarks/gpu.py [--new-tokens 64] [--compile] [--tiny]

Both implementations share one set of weights (ours attaches the reference's tensors), so a 9b model fits twice on
an 80 GB card. Prints decode tokens/s at batch 1 and 16 and the fraction of the memory-bandwidth bound (weight bytes
per decode step / measured bandwidth of x @ W.T over a bf16 matrix as large), for ours eager, ours with the decode
step captured as a CUDA graph (`cuda_graphs=True`), ours with `compile=True` (torch.compile + CUDA graph) when
asked, and the reference. It also prints how many greedy tokens each variant shares with the reference at batch 1
(bf16 rounding may make long greedy runs part ways). `--tiny` runs a small config, on the CPU if no GPU is present
(where the CUDA-graph variants are left out), to check the script itself.
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch
from common import (
    bench_config,
    decode_weight_bytes,
    idefics_9b_config,
    make_inputs,
    matvec_bandwidth,
    measure,
    ours_sharing,
    randomize_,
)
from tqdm import tqdm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure ours with compile=True")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the GPU kernel time of ours' decode steps")
    args = parser.parse_args()
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = bench_config("tiny") if args.tiny else idefics_9b_config()

    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**cfg, dtype=dtype)).to(dtype).eval()
    randomize_(ref)
    ours = ours_sharing(ref, device).eval()  # the reference's tensors: no second copy

    impls = {"ours": (ours, {})}
    if device == "cuda":
        impls["ours+graphs"] = (ours, {"cuda_graphs": True})
    if args.compile:
        impls["ours+compile"] = (ours, {"compile": True})
    if not args.no_reference:
        impls["reference"] = (ref, {})

    weight_bytes = decode_weight_bytes(ours)
    bandwidth = matvec_bandwidth(weight_bytes, dtype=dtype, device=device, sync=sync)
    bound = bandwidth / weight_bytes
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    n = args.new_tokens
    print(f"{gpu}: {'tiny' if args.tiny else 'idefics-9b'}-shaped, bf16, prompt {args.prompt}, {n} new tokens")
    print(f"weights per decode step {weight_bytes / 1e9:.2f} GB; bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"bound {bound:.1f} tokens/s at batch 1", flush=True)  # fmt: skip

    results: dict[str, dict[int, float]] = {name: {} for name in impls}
    for b in tqdm((1, 16), desc="batch sizes"):
        inputs = make_inputs(cfg, batch=b, prompt=args.prompt, device=device, dtype=dtype)

        def generator(model, extra, inputs=inputs):
            def generate(k):
                with torch.inference_mode():
                    return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, **extra)

            return generate

        # the compiled variant goes last and alone, so that a long compilation costs no other figure
        groups = [[i for i in impls if i != "ours+compile"], [i for i in impls if i == "ours+compile"]]
        for group in groups:
            gens = {}
            for name in group:  # warm up (and compile) one at a time, so a failure drops only that variant
                start = time.perf_counter()
                try:
                    out = generator(*impls[name])(n)
                    sync()
                except Exception:
                    traceback.print_exc()
                    print(f"{name}: failed at batch {b}, left out", flush=True)
                    continue
                gens[name] = generator(*impls[name])
                print(f"batch {b} {name}: first request {time.perf_counter() - start:.1f} s", flush=True)
                if b == 1:
                    results[name]["tokens"] = out[0, args.prompt :].cpu()
            for name, (t1, tn) in measure(gens, n=n, repeat=args.repeat, sync=sync).items():
                results[name][b] = b * (n - 1) / (tn - t1)
                print(f"batch {b} {name}: {results[name][b]:.1f} tokens/s", flush=True)

    print(f"\n{'':14}{'b1 tok/s':>10}{'% bound':>9}{'b16 tok/s':>11}{'same greedy tokens as ref':>27}")
    ref_tokens = results.get("reference", {}).get("tokens")
    for name, r in results.items():
        same = "-"
        if ref_tokens is not None and "tokens" in r:
            diverge = (r["tokens"] != ref_tokens).nonzero()
            same = f"{int(diverge[0]) if len(diverge) else n}/{n}"
        b1, b16 = r.get(1, float("nan")), r.get(16, float("nan"))
        print(f"{name:14}{b1:10.1f}{100 * b1 / bound:8.0f}%{b16:11.1f}{same:>27}")
    if args.profile and device == "cuda":
        profile(
            ours, make_inputs(cfg, batch=1, prompt=args.prompt, device=device, dtype=dtype), n, compile=args.compile
        )
    if "reference" in results:
        r = results["reference"]
        for name in [k for k in results if k != "reference"]:
            o = results[name]
            print(f"ratio {name}/reference: batch-1 {o.get(1, float('nan')) / r.get(1, float('nan')):.2f}x, "
                  f"batch-16 {o.get(16, float('nan')) / r.get(16, float('nan')):.2f}x")  # fmt: skip


def profile(model, inputs: dict, n: int, *, compile: bool) -> None:
    """GPU kernel time per decode step at batch 1 (steps run without a CUDA graph, so that kernels are listed; a
    1-token request is subtracted to drop the prefill), split into matrix products and the rest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def kernels(k: int) -> dict[str, tuple[float, int]]:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, compile=compile,
                           cuda_graphs=False)  # fmt: skip
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof, torch.inference_mode():
            model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, compile=compile,
                           cuda_graphs=False)  # fmt: skip
            torch.cuda.synchronize()
        return {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages() if e.self_device_time_total}

    one, full = kernels(1), kernels(n)
    steps = {k: ((t - one.get(k, (0, 0))[0]) / (n - 1), (c - one.get(k, (0, 0))[1]) // (n - 1))
             for k, (t, c) in full.items()}  # fmt: skip
    total = sum(t for t, _ in steps.values())
    gemm = sum(
        t
        for k, (t, _) in steps.items()
        if any(w in k.lower() for w in ("gemm", "gemv", "mm_", "cublas", "cutlass", "nvjet"))
    )
    print(f"\nprofile, ours {'compile' if compile else 'eager'}, batch 1: kernel time {total / 1e3:.2f} ms per step, "
          f"{100 * gemm / max(total, 1e-9):.0f}% in matrix products")  # fmt: skip
    for key, (t, c) in sorted(steps.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"{t:9.1f} us {c:5d}x  {key[:100]}")


if __name__ == "__main__":
    main()
