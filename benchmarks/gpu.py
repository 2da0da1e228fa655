"""Decode speed on a GPU for an idefics-9b-shaped model (random weights, bf16), ours vs transformers.

    python benchmarks/gpu.py [--new-tokens 64] [--compile] [--tiny]

Both implementations share one set of weights (ours attaches the reference's tensors), so a 9b model fits twice on
an 80 GB card. Prints decode tokens/s at batch 1 and 16 and the fraction of the memory-bandwidth bound (weight bytes
per decode step / measured bandwidth of x @ W.T over a bf16 matrix as large). `--tiny` runs a small config, on the
CPU if no GPU is present, to check the script itself.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    bench_config,
    decode_weight_bytes,
    idefics_9b_config,
    make_inputs,
    matvec_bandwidth,
    measure,
    randomize_,
)
from tqdm import tqdm

import idefics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure ours with compile=True")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
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
    config = idefics.IdeficsConfig.from_dict(ref.config.to_dict())
    with torch.device("meta"):
        ours = idefics.IdeficsForVisionText2Text(config)
    ours.load_state_dict(ref.state_dict(), assign=True)  # shares the reference's tensors: no second copy
    ours.model.rotary_emb.reset_buffers(device)
    ours.eval()

    impls = {"ours": (ours, {})}
    if args.compile:
        impls["ours+compile"] = (ours, {"compile": True})
    if not args.no_reference:
        impls["reference"] = (ref, {})
    n = args.new_tokens
    results: dict[str, dict[int, float]] = {name: {} for name in impls}
    for b in tqdm((1, 16), desc="batch sizes"):
        inputs = make_inputs(cfg, batch=b, prompt=args.prompt, device=device, dtype=dtype)

        def generator(model, extra, inputs=inputs):
            def generate(k):
                with torch.inference_mode():
                    return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, **extra)

            return generate

        gens = {name: generator(*impl) for name, impl in impls.items()}
        for name, (t1, tn) in measure(gens, n=n, repeat=args.repeat, sync=sync).items():
            results[name][b] = b * (n - 1) / (tn - t1)

    weight_bytes = decode_weight_bytes(ours)
    bandwidth = matvec_bandwidth(weight_bytes, dtype=dtype, device=device, sync=sync)
    bound = bandwidth / weight_bytes
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{gpu}: {'tiny' if args.tiny else 'idefics-9b'}-shaped, bf16, prompt {args.prompt}, {n} new tokens")
    print(f"weights per decode step {weight_bytes / 1e9:.2f} GB; bandwidth {bandwidth / 1e9:.0f} GB/s; "
          f"bound {bound:.1f} tokens/s at batch 1")  # fmt: skip
    print(f"{'':14}{'b1 tok/s':>10}{'% bound':>9}{'b16 tok/s':>11}")
    for name, r in results.items():
        print(f"{name:14}{r[1]:10.1f}{100 * r[1] / bound:8.0f}%{r[16]:11.1f}")
    if "reference" in results:
        o, r = results["ours"], results["reference"]
        print(f"ratio ours/ref: batch-1 {o[1] / r[1]:.2f}x, batch-16 {o[16] / r[16]:.2f}x")


if __name__ == "__main__":
    main()
