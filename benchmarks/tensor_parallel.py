"""Tensor parallelism: the cost of the TP code path at world size 1, world size 2 vs 1 on CPU, and each rank's memory.

    python benchmarks/tensor_parallel.py [--preset bench|wide|deep|tiny] [--repeat 5] [--new-tokens 32]
    torchrun --nproc_per_node=8 benchmarks/tensor_parallel.py --gpu-preset 80b   # on a machine with 8 GPUs

CPU (the default), all on the same checkpoint:
1. One process, side by side: the model loaded plainly and loaded with `tp_plan="auto"` in a process group of one
   (gloo), batch-1 decode interleaved round by round; the overhead of the TP path must stay under 3%.
2. Peak RSS of loading the fp32 checkpoint: one process alone, and each rank of `torchrun --nproc_per_node=2`
   (fresh processes each, so their peaks are their own), against the rank's share of the weight bytes.
3. Batch-1 decode tokens/s with 2 ranks of 1 thread each (gloo) against 1 process with 2 threads: the same cores.
GPU (`--gpu-preset`, under torchrun with NCCL): an idefics-80b-shaped model (or 9b) with random weights built
directly as each rank's shards in bf16 (no checkpoint is needed), decode tokens/s at batch 1 and 16, and the time of
one step's all-reduces alone, against the weight-streaming time of the rank's shard (BENCHMARKS.md has the expected
figures on paper).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import bench_config, idefics_9b_config, make_inputs, measure, timed
from generate import build_checkpoint

import idefics
from idefics.parallel import leave
from idefics.quantization import weight_bytes

HERE = Path(__file__).resolve()


def idefics_80b_config() -> dict:
    """idefics-80b's shapes (LLaMA-65B decoder, the same ViT-H/14 and perceiver as 9b)."""
    return idefics_9b_config() | dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                                      num_attention_heads=64)  # fmt: skip


def decode_rate(model, cfg: dict, *, n: int, repeat: int, device="cpu", batch: int = 1, sync=lambda: None) -> float:
    inputs = make_inputs(cfg, batch=batch, prompt=64, device=device, dtype=model.dtype)

    def gen(k):
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k)

    (t1, tn) = measure({"m": gen}, n=n, repeat=repeat, sync=sync)["m"]
    return batch * (n - 1) / (tn - t1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    """This process's peak RSS so far (VmHWM; ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One rank (or the lone process) of part 2 / 3: load, report peak RSS, optionally time decode."""
    before = rss_mb()
    tp = "auto" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    model = idefics.IdeficsForVisionText2Text.from_pretrained(args.worker, tp_plan=tp)
    loaded = rss_mb()
    result = dict(rss_before_mb=before, rss_loaded_mb=loaded, weight_mb=weight_bytes(model) / 2**20)
    if args.decode:
        result["tok_s"] = decode_rate(model, bench_config(args.preset), n=args.new_tokens, repeat=args.repeat)
    rank = int(os.environ.get("RANK", "0"))
    Path(args.report).with_suffix(f".{rank}.json").write_text(json.dumps(result))
    if tp:
        leave()


def launch(folder: Path, report: Path, args: argparse.Namespace, *, ranks: int, decode: bool) -> list[dict]:
    command = [sys.executable, str(HERE)]
    env = dict(os.environ)
    if ranks > 1:
        command = [str(Path(sys.executable).with_name("torchrun")), f"--nproc_per_node={ranks}", "--standalone",
                   str(HERE)]  # fmt: skip
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // ranks))
    else:
        env["OMP_NUM_THREADS"] = str(args.threads)
    flags = ["--worker", str(folder), "--report", str(report), "--preset", args.preset, "--new-tokens",
             str(args.new_tokens), "--repeat", str(args.repeat), *(["--decode"] if decode else [])]  # fmt: skip
    subprocess.run([*command, *flags], check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(report.with_suffix(f".{r}.json").read_text()) for r in range(ranks)]


def cpu(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cfg = bench_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_checkpoint(cfg, folder)
        # 1. the TP path at world size 1, side by side with the plain model in this process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))  # fmt: skip
        plain = idefics.IdeficsForVisionText2Text.from_pretrained(folder)
        one = idefics.IdeficsForVisionText2Text.from_pretrained(folder, tp_plan="auto")
        inputs = make_inputs(cfg, batch=1, prompt=64)

        def gen(model):
            def run(k):
                with torch.inference_mode():
                    return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k)

            return run

        times = measure({"plain": gen(plain), "tp1": gen(one)}, n=args.new_tokens, repeat=args.repeat)
        rates = {name: (args.new_tokens - 1) / (tn - t1) for name, (t1, tn) in times.items()}
        del plain, one
        leave()
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key)
        # 2 and 3: fresh processes
        alone = launch(folder, Path(tmp) / "alone", args, ranks=1, decode=True)[0]
        pair = launch(folder, Path(tmp) / "pair", args, ranks=2, decode=True)
    print(f"\npreset {args.preset}, fp32, batch-1 decode of {args.new_tokens} tokens, {args.threads} threads")
    overhead = rates["plain"] / rates["tp1"] - 1
    print(f"1. world size 1: plain {rates['plain']:.1f} tok/s, tp_plan='auto' {rates['tp1']:.1f} tok/s "
          f"(TP path overhead {100 * overhead:+.1f}%)")  # fmt: skip
    print(f"2. peak RSS loading: one process {alone['rss_loaded_mb']:.0f} MB ({alone['weight_mb']:.0f} MB weights)")
    for r, rank in enumerate(pair):
        print(f"   rank {r} of 2: {rank['rss_loaded_mb']:.0f} MB (its weights {rank['weight_mb']:.0f} MB, "
              f"{rank['weight_mb'] / alone['weight_mb']:.2f} of the whole; RSS before loading "
              f"{rank['rss_before_mb']:.0f} MB)")  # fmt: skip
    print(
        f"3. decode: 1 process x {args.threads} threads {alone['tok_s']:.1f} tok/s; 2 ranks x "
        f"{max(1, args.threads // 2)} thread {pair[0]['tok_s']:.1f} tok/s ({pair[0]['tok_s'] / alone['tok_s']:.2f}x)"
    )


@torch.no_grad()
def gpu(args: argparse.Namespace) -> None:
    """Under torchrun with NCCL: random shards of an 80b/9b-shaped model on each GPU, decode and all-reduce times."""
    import torch.distributed as dist

    from idefics.parallel import apply_plan, join, local_device

    device = local_device(args.device)
    tp = join(device)
    cfg = {"80b": idefics_80b_config, "9b": idefics_9b_config}.get(args.gpu_preset, lambda: bench_config("bench"))()
    config = idefics.IdeficsConfig.from_dict(cfg)
    with torch.device("meta"):
        model = idefics.IdeficsForVisionText2Text(config)
    apply_plan(model, tp)
    model.to_empty(device=device)
    torch.manual_seed(tp.rank)
    for p in model.parameters():
        p.data = (torch.randn_like(p, dtype=torch.float32) * p.shape[-1] ** -0.5 if p.ndim > 1
                  else torch.ones_like(p, dtype=torch.float32)).to(torch.bfloat16)  # fmt: skip
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)
    model.tensor_parallel = tp
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    shard = weight_bytes(model)
    rates = {b: decode_rate(model, cfg, n=args.new_tokens, repeat=args.repeat, device=device, batch=b, sync=sync)
             for b in (1, 16)}  # fmt: skip
    d = config.hidden_size
    x = torch.randn(1, 1, d, device=device, dtype=torch.bfloat16)
    reductions = 2 * (config.num_hidden_layers + config.num_cross_layers)  # o_proj and down_proj per layer

    def all_reduces():
        for _ in range(reductions):
            dist.all_reduce(x, group=tp.group)

    reduce_s = timed(all_reduces, repeat=args.repeat, sync=sync)
    if tp.is_main:
        print(f"{args.gpu_preset} on {tp.size} x {device.type} (bf16): {shard / 2**30:.2f} GiB of weights per rank")
        print(f"decode batch 1: {rates[1]:.1f} tok/s; batch 16: {rates[16]:.1f} tok/s")
        print(f"{reductions} all-reduces of (1, {d}) bf16 per token: {1e3 * reduce_s:.3f} ms")
    leave()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=["bench", "wide", "deep", "tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gpu-preset", choices=["80b", "9b", "bench"], help="under torchrun on GPUs (see above)")
    parser.add_argument("--device", default="cuda", help="with --gpu-preset (cpu: a dry run of it with gloo)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    elif args.gpu_preset:
        gpu(args)
    else:
        start = time.perf_counter()
        cpu(args)
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
