"""Checkpoint load benchmark: `idefics` vs transformers on an idefics-shaped random fp32 checkpoint (~1.86 GB).

Builds the checkpoint in 500 MB shards (and a tiny one used to warm up each process), then loads it with
`IdeficsForVisionText2Text.from_pretrained(dir, dtype=...)` of each implementation, as fp32 and as bf16, each in a
fresh process. Reported per run: load time, peak RSS above the post-import baseline (VmHWM, reset after imports and
a warm-up load), and RSS right after loading. RSS counts the memory-mapped file pages that were touched, so a lazy
fp32 load stays near zero until the weights are used. The page cache is warm for every run (the file was just
written).

    python benchmarks/load.py [--dir DIR] [--keep] [--repeat 3] [--shard-size 500MB]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 10**9
MB = 10**6
# hidden 2048, 4 decoder layers with 2 gated cross-attention layers, ViT 768x4, a perceiver resampler: 466M params.
CONFIG = dict(
    vocab_size=32000,
    additional_vocab_size=2,
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=4,
    num_attention_heads=16,
    cross_layer_interval=2,
    use_resampler=True,
    vision_config=dict(embed_dim=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12),
    perceiver_config=dict(use_resampler=True, resampler_depth=2, resampler_n_heads=8, resampler_head_dim=64),
)
TINY = CONFIG | dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2)
RUNS = [(impl, dtype) for dtype in ("float32", "bfloat16") for impl in ("ours", "transformers")]


def build_checkpoint(directory: Path, config_kwargs: dict, *, shard_size: str) -> int:
    """Write config.json and random fp32 weights (N(0, 0.02), one key at a time) to `directory`; return the bytes."""
    import torch
    import transformers
    from tqdm import tqdm

    from idefics.loading import save_checkpoint

    config = transformers.IdeficsConfig(**config_kwargs)
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in transformers.IdeficsForVisionText2Text(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator) * 0.02 for k, s in tqdm(shapes.items(), desc="Random weights")}
    config.save_pretrained(directory)
    save_checkpoint(state, directory, max_shard_size=shard_size)
    return sum(t.nbytes for t in state.values())


def _memory() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def worker(impl: str, dtype_name: str, directory: str, warmup: str) -> None:
    """Load once in this process and print one JSON line: seconds, peak and after-load RSS above the baseline."""
    import torch

    if impl == "ours":
        from idefics import IdeficsForVisionText2Text
    else:
        from transformers import IdeficsForVisionText2Text
    dtype = getattr(torch, dtype_name)
    IdeficsForVisionText2Text.from_pretrained(warmup, dtype=dtype)  # pay lazy imports before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline, _ = _memory()
    start = time.perf_counter()
    model = IdeficsForVisionText2Text.from_pretrained(directory, dtype=dtype)
    seconds = time.perf_counter() - start
    rss, peak = _memory()
    dtypes = sorted({str(t.dtype) for t in model.state_dict().values()})
    print(json.dumps(dict(seconds=seconds, peak=peak - baseline, after=rss - baseline, dtypes=dtypes)))


def measure(impl: str, dtype: str, directory: Path, warmup: Path) -> dict:
    command = [sys.executable, __file__, "--worker", impl, dtype, str(directory), str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{impl} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[tuple[str, str], list[dict]], *, bf16_bytes: int) -> None:
    """Print the median (and fastest) of each configuration, then the ratios the goals are stated in."""
    medians = {
        run: {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak", "after")}
        for run, runs in results.items()
    }
    print(f"{'impl':<13} {'dtype':<9} {'load s':>7} {'(min)':>6} {'peak MB':>8} {'after MB':>9}  loaded dtypes")
    for (impl, dtype), m in medians.items():
        runs = results[impl, dtype]
        fastest, dtypes = min(r["seconds"] for r in runs), ",".join(runs[0]["dtypes"])
        row = f"{m['seconds']:7.2f} {fastest:6.2f} {m['peak'] / MB:8.0f} {m['after'] / MB:9.0f}"
        print(f"{impl:<13} {dtype:<9} {row}  {dtypes}")
    for dtype in ("float32", "bfloat16"):
        ours, ref = medians["ours", dtype], medians["transformers", dtype]
        speed = ours["seconds"] / ref["seconds"]
        peaks = f"ours {ours['peak'] / bf16_bytes:.2f}, transformers {ref['peak'] / bf16_bytes:.2f}"
        print(f"{dtype}: time ours/transformers {speed:.2f}; peak / bf16 model bytes: {peaks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where to build the checkpoint (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    parser.add_argument("--repeat", type=int, default=5, help="runs per (implementation, dtype); medians reported")
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    from tqdm import tqdm

    root = args.dir or Path(tempfile.mkdtemp(prefix="idefics-load-bench-"))
    checkpoint, warmup = root / "checkpoint", root / "warmup"  # only these are deleted when --dir is given
    try:
        fp32_bytes = build_checkpoint(checkpoint, CONFIG, shard_size=args.shard_size)
        build_checkpoint(warmup, TINY, shard_size=args.shard_size)
        shards = len(list(checkpoint.glob("*.safetensors")))
        bf16_bytes = fp32_bytes // 2
        print(f"checkpoint: {fp32_bytes / GB:.2f} GB fp32 in {shards} shards; bf16 model: {bf16_bytes / GB:.2f} GB")

        results: dict[tuple[str, str], list[dict]] = {run: [] for run in RUNS}
        for _ in tqdm(range(args.repeat), desc="Rounds"):
            for impl, dtype in RUNS:  # interleaved, so drift hits every configuration alike
                results[impl, dtype].append(measure(impl, dtype, checkpoint, warmup))
        report(results, bf16_bytes=bf16_bytes)
    finally:
        if args.keep:
            print(f"kept {checkpoint}")
        else:
            for folder in (checkpoint, warmup) if args.dir else (root,):
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
