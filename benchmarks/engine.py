"""Serving throughput: the continuous-batching engine vs one-at-a-time generate() vs static batching, one process.

    python benchmarks/engine.py [--preset tiny|bench|gpu9b] [--requests 32] [--rate 100] [--concurrency 16]
    python benchmarks/engine.py --quantize int8 --compile on    # the int8 CPU fast path under load

A stream of requests with Poisson arrivals (`--rate` per second; prompts of mixed lengths with 0-2 images, mixed
max_tokens, greedy, EOS ignored so every path generates the same counts) goes through (a) the engine with
`--concurrency` slots, (b) generate() one request at a time in arrival order, (c) static batching: generate() on
groups of `--concurrency` in arrival order, each group starting once all its requests arrived and the previous
group finished, and running until its longest request is done. Prints request throughput, output tokens/s, TTFT and
inter-token latency p50/p99 for each, the ratios, and how many greedy outputs are identical across the three.
`--steady` also measures steady-state decode tokens/s of the engine with `--concurrency` requests running against
generate() at the same batch size (with `compile=True` on CUDA).

Presets: `tiny` (seconds, CPU; checks the script), `bench` (benchmarks/common.py's CPU config, fp32, 2 threads),
`gpu9b` (an idefics-9b-shaped model in bf16 on CUDA, random weights; written for a GPU, not yet run).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch
from common import bench_config, idefics_9b_config, ours_sharing, randomize_
from tqdm import tqdm

from idefics.generation import GenerationConfig, generate_steps
from idefics.serving import Engine, EngineConfig, SamplingParams

PRESETS = {  # prompt lengths, max_tokens ranges, defaults
    "tiny": dict(prompt=(8, 32), new=(4, 16), requests=12, concurrency=4, device="cpu", dtype=torch.float32),
    "bench": dict(prompt=(16, 128), new=(16, 64), requests=32, concurrency=16, device="cpu", dtype=torch.float32),
    "gpu9b": dict(prompt=(64, 512), new=(64, 256), requests=64, concurrency=32, device="cuda", dtype=torch.bfloat16),
}


@dataclass
class Job:
    arrival: float  # seconds after the start
    inputs: dict  # input_ids (1, t), and pixel_values / image_attention_mask when it has images
    max_tokens: int


@dataclass
class Outcome:
    tokens: list[int]
    ttft: float  # seconds from the request's arrival to its first token
    gaps: list[float]  # seconds between its consecutive tokens


def build_model(preset: str, device: str, dtype: torch.dtype):
    import transformers

    cfg = idefics_9b_config() if preset == "gpu9b" else bench_config(preset)
    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**cfg)).to(dtype).eval()
    randomize_(ref)
    return ours_sharing(ref, device).eval(), cfg


def make_jobs(cfg: dict, n: int, *, rate: float, prompt: tuple[int, int], new: tuple[int, int], device, dtype, seed=0):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    r = cfg["vision_config"]["image_size"]
    jobs, clock = [], 0.0
    for _ in range(n):
        clock += rng.expovariate(rate) if rate > 0 else 0.0
        t, images = rng.randint(*prompt), rng.randint(0, 2)
        inputs = {"input_ids": torch.randint(3, cfg["vocab_size"], (1, t), generator=g).to(device)}
        if images:
            mask = torch.zeros(1, t, images, dtype=torch.long)
            for j in range(images):  # image j seen from token 1 + 4j on
                mask[0, 1 + 4 * j :] = 0
                mask[0, 1 + 4 * j :, j] = 1
            pixels = torch.randn(1, images, 3, r, r, generator=g)
            inputs |= {"pixel_values": pixels.to(device, dtype), "image_attention_mask": mask.to(device)}
        jobs.append(Job(clock, inputs, rng.randint(*new)))
    return jobs


def wait_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def run_engine(model, jobs: list[Job], concurrency: int, max_len: int, compile) -> tuple[list[Outcome], float, dict]:
    config = EngineConfig(max_batch_size=concurrency, max_model_len=max_len, max_queue=len(jobs),
                          max_images_per_request=2, compile=compile)  # fmt: skip
    with Engine(model, None, config) as engine:
        start = time.perf_counter()
        streams = []
        for job in jobs:
            wait_until(start + job.arrival)
            params = SamplingParams(max_tokens=job.max_tokens, temperature=0, ignore_eos=True)
            streams.append(engine.submit(job.inputs, params))
        outcomes = [Outcome(c.token_ids, c.timings["ttft"], []) for s in streams for c in s.result()]
        end = time.perf_counter()
        stats = engine.stats()
    return outcomes, end - start, stats


def steps_timed(model, inputs: dict, new: int, attention_mask=None) -> tuple[list[list[int]], list[float]]:
    """generate()'s own loop (generate_steps), greedy, EOS ignored: tokens per row and the time of each step."""
    ids = inputs["input_ids"]
    images = {k: v for k, v in inputs.items() if k != "input_ids"}
    config = GenerationConfig(max_new_tokens=new, eos_token_id=[], pad_token_id=0)
    times, steps = [], []
    for step in generate_steps(model, ids, config=config, attention_mask=attention_mask, **images):
        steps.append(step.tokens)
        times.append(time.perf_counter())
    return torch.stack(steps, 1).tolist(), times


def run_sequential(model, jobs: list[Job]) -> tuple[list[Outcome], float]:
    outcomes = []
    start = time.perf_counter()
    for job in tqdm(jobs, desc="one at a time", leave=False):
        wait_until(start + job.arrival)
        tokens, times = steps_timed(model, job.inputs, job.max_tokens)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        outcomes.append(Outcome(tokens[0], times[0] - start - job.arrival, gaps))
    return outcomes, time.perf_counter() - start


def pad_group(jobs: list[Job]) -> tuple[dict, torch.Tensor]:
    """Left-pad a group's prompts into one batch; images padded to the group's most with zero images."""
    t = max(j.inputs["input_ids"].shape[1] for j in jobs)
    n = max(j.inputs["pixel_values"].shape[1] if "pixel_values" in j.inputs else 0 for j in jobs)
    device = jobs[0].inputs["input_ids"].device
    ids = torch.zeros(len(jobs), t, dtype=torch.long, device=device)
    mask = torch.zeros(len(jobs), t, dtype=torch.long, device=device)
    batch = {"input_ids": ids}
    if n:
        ref = next(j.inputs["pixel_values"] for j in jobs if "pixel_values" in j.inputs)
        pixels = torch.zeros(len(jobs), n, *ref.shape[2:], dtype=ref.dtype, device=device)
        image_mask = torch.zeros(len(jobs), t, n, dtype=torch.long, device=device)
        batch |= {"pixel_values": pixels, "image_attention_mask": image_mask}
    for row, job in enumerate(jobs):
        length = job.inputs["input_ids"].shape[1]
        ids[row, t - length :] = job.inputs["input_ids"][0]
        mask[row, t - length :] = 1
        if "pixel_values" in job.inputs:
            k = job.inputs["pixel_values"].shape[1]
            batch["pixel_values"][row, :k] = job.inputs["pixel_values"][0]
            batch["image_attention_mask"][row, t - length :, :k] = job.inputs["image_attention_mask"][0]
    return batch, mask


def run_static(model, jobs: list[Job], size: int) -> tuple[list[Outcome], float]:
    outcomes = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(jobs), size), desc="static batches", leave=False):
        group = jobs[i : i + size]
        wait_until(start + max(j.arrival for j in group))
        batch, mask = pad_group(group)
        tokens, times = steps_timed(model, batch, max(j.max_tokens for j in group), attention_mask=mask)
        for job, row in zip(group, tokens, strict=True):
            k = job.max_tokens
            gaps = [b - a for a, b in zip(times[: k - 1], times[1:k], strict=True)]
            outcomes.append(Outcome(row[:k], times[0] - start - job.arrival, gaps))
    return outcomes, time.perf_counter() - start


def pct(data: list[float], q: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, int(q * len(data)))] if data else 0.0


def summarise(name: str, outcomes: list[Outcome], seconds: float, *, itl: list[float] | None = None) -> dict:
    tokens = sum(len(o.tokens) for o in outcomes)
    ttft = [o.ttft for o in outcomes]
    gaps = itl if itl is not None else [g for o in outcomes for g in o.gaps]
    return {"name": name, "req_s": len(outcomes) / seconds, "tok_s": tokens / seconds, "ttft50": pct(ttft, 0.5),
            "ttft99": pct(ttft, 0.99), "itl50": pct(gaps, 0.5), "itl99": pct(gaps, 0.99)}  # fmt: skip


def steady_state(
    model, cfg: dict, concurrency: int, *, prompt: int, new: int, device, dtype, sync, max_len: int, compile
) -> tuple[float, float]:
    """Decode tokens/s with `concurrency` rows running: the engine vs generate() at that batch size."""
    jobs = make_jobs(cfg, concurrency, rate=0, prompt=(prompt, prompt), new=(new, new), device=device, dtype=dtype)
    for job in jobs:  # text only, so both sides decode the same work
        job.inputs = {"input_ids": job.inputs["input_ids"]}
    config = EngineConfig(max_batch_size=concurrency, max_model_len=max_len, compile=compile)
    with Engine(model, None, config) as engine:
        params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        streams = [engine.submit(j.inputs, params) for j in jobs]
        firsts, lasts = [], []
        for stream in streams:
            (c,) = stream.result()
            firsts.append(c.timings["ttft"])
            lasts.append(c.timings["e2e"])
    engine_rate = concurrency * (new - 1) / (min(lasts) - max(firsts)) if min(lasts) > max(firsts) else float("nan")
    ids = torch.cat([j.inputs["input_ids"] for j in jobs])
    compile = device == "cuda"

    def gen(k):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=k, min_new_tokens=k, compile=compile)
        sync()

    gen(new), gen(1)
    t0 = time.perf_counter()
    gen(1)
    t1 = time.perf_counter()
    gen(new)
    t2 = time.perf_counter()
    return engine_rate, concurrency * (new - 1) / ((t2 - t1) - (t1 - t0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=list(PRESETS))
    parser.add_argument("--requests", type=int, help="default: per preset")
    parser.add_argument("--rate", type=float, default=100.0, help="Poisson arrivals per second (0: all at once)")
    parser.add_argument("--concurrency", type=int, help="engine slots and static batch size (default: per preset)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="default: per preset")
    parser.add_argument("--max-tokens", type=int, nargs=2, metavar=("MIN", "MAX"), help="default: per preset")
    parser.add_argument("--steady", action="store_true", help="also measure steady-state decode vs generate()")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="quantise our model's Linears (all three paths)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="the engine's compile setting (auto: CUDA graphs on CUDA, eager on CPU)")  # fmt: skip
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.prompt_len:
        preset["prompt"] = tuple(args.prompt_len)
    if args.max_tokens:
        preset["new"] = tuple(args.max_tokens)
    torch.set_num_threads(args.threads)
    device, dtype = preset["device"], preset["dtype"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n, concurrency = args.requests or preset["requests"], args.concurrency or preset["concurrency"]
    model, cfg = build_model(args.preset, device, dtype)
    if args.quantize:
        from idefics.quantization import QuantizationConfig, quantize_model

        quantize_model(model, QuantizationConfig(args.quantize))
    max_len = preset["prompt"][1] + preset["new"][1]
    jobs = make_jobs(cfg, n, rate=args.rate, prompt=preset["prompt"], new=preset["new"], device=device, dtype=dtype)
    # Warm-up: the engine's rows finish one by one, so every batch-size bucket is built (compiled) before timing.
    warm = make_jobs(cfg, concurrency, rate=0, prompt=preset["prompt"], new=(2, 2), device=device, dtype=dtype, seed=1)
    for i, job in enumerate(warm):
        job.max_tokens = 2 + concurrency - i  # the first slot lives longest: the batch shrinks through every bucket
    compile = {"auto": "auto", "on": True, "off": False}[args.compile]
    run_engine(model, warm, concurrency, max_len, compile)
    run_sequential(model, warm[:2]), run_static(model, warm[:2], 2)

    engine_out, seconds, stats = run_engine(model, jobs, concurrency, max_len, compile)
    engine = summarise("engine", engine_out, seconds)
    engine |= {"itl50": stats["itl"]["p50"], "itl99": stats["itl"]["p99"]}  # every token's gap, from the engine
    seq_out, seconds = run_sequential(model, jobs)
    static_out, static_seconds = run_static(model, jobs, concurrency)
    results = [engine, summarise("one-at-a-time", seq_out, seconds), summarise("static", static_out, static_seconds)]

    print(f"\npreset={args.preset} requests={n} rate={args.rate}/s concurrency={concurrency} threads={args.threads} "
          f"prompt={preset['prompt']} max_tokens={preset['new']} "
          f"({dtype}, {device}); engine cache {stats['cache_bytes'] / 1e6:.1f} MB")  # fmt: skip
    print(f"{'':15}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>10}{'p99':>8}  (seconds)")
    for r in results:
        print(f"{r['name']:15}{r['req_s']:8.2f}{r['tok_s']:11.1f}{r['ttft50']:10.3f}{r['ttft99']:8.3f}"
              f"{r['itl50']:10.4f}{r['itl99']:8.4f}")  # fmt: skip
    e, s, b = results
    print(f"engine / one-at-a-time: {e['tok_s'] / s['tok_s']:.2f}x output tok/s; "
          f"engine / static: {e['tok_s'] / b['tok_s']:.2f}x")  # fmt: skip
    same = sum(a.tokens == x.tokens == y.tokens for a, x, y in zip(engine_out, seq_out, static_out, strict=True))
    same_seq = sum(a.tokens == x.tokens for a, x in zip(engine_out, seq_out, strict=True))
    print(f"greedy outputs identical: engine == one-at-a-time {same_seq}/{n}; all three {same}/{n}")
    if args.steady:
        engine_rate, generate_rate = steady_state(model, cfg, concurrency, prompt=preset["prompt"][1],
                                                  new=preset["new"][1], device=device, dtype=dtype, sync=sync,
                                                  max_len=max_len, compile=compile)  # fmt: skip
        print(f"steady-state decode at batch {concurrency}: engine {engine_rate:.1f} tok/s, generate() "
              f"{generate_rate:.1f} tok/s ({100 * engine_rate / generate_rate:.0f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
