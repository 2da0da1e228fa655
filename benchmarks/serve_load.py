"""Load on `idefics serve`, the way `vllm bench serve` drives a server: streamed openai-chat requests with an image
as a data URI, exact `max_tokens` with `ignore_eos`, Poisson arrivals (or all at once) under a concurrency cap.

    python benchmarks/serve_load.py --launch [--preset demo|bench] [--num-requests 64] [--max-concurrency 16]
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000 --model-name idefics-demo ...

Prints, for the load and for the same requests sent one at a time: request throughput, output tokens/s, and TTFT,
TPOT (per output token after the first), ITL (between streamed tokens) and end-to-end latency p50/p99; then the
ratio of output tokens/s. With `--launch` the script starts its own `idefics serve` (max batch size =
`--max-concurrency`) and stops it at the end; `--engine-baseline` then also sends the same load straight to an
in-process `Engine` (the server stopped, so the two do not share the CPU; images already decoded, so the HTTP side
also pays for base64 and PNG decoding) and prints how much of the engine's throughput the HTTP layer keeps.

Presets (with --launch): `demo` is the bundled demo model; `bench` is benchmarks/common.py's CPU config with the
demo model's vocabulary and processor (random weights, built once into build/serve_bench_model).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [ROOT / "examples" / "red_circle.png", ROOT / "examples" / "blue_triangle.png"]
QUESTIONS = ["What color is the shape?", "What shape is this?", "Describe the image."]


@dataclass
class Result:
    ok: bool
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first token
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # seconds between consecutive streamed tokens
    error: str = ""
    text: str = ""  # the streamed reply


def build_requests(n: int, *, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in IMAGES]
    return [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": rng.choice(urls)}},
                                                   {"type": "text", "text": rng.choice(QUESTIONS)}]}],
         "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
        for _ in range(n)
    ]  # fmt: skip


async def send(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> Result:
    """One streamed chat request; a token is each content chunk, the count is the usage chunk's."""
    start = time.perf_counter()
    result, last = Result(ok=False), None
    try:
        async with client.stream("POST", url, json={**body, "stream": True,
                                 "stream_options": {"include_usage": True}}, headers=headers) as response:  # fmt: skip
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content") is not None and "role" not in choice["delta"]:
                        result.text += choice["delta"]["content"]
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
    except httpx.HTTPError as err:
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.e2e, result.ok = time.perf_counter() - start, True
    return result


async def run_load(base_url: str, model: str, bodies: list[dict], *, rate: float, concurrency: int,
                   api_key: str | None, seed: int, label: str) -> tuple[list[Result], float]:  # fmt: skip
    """Send `bodies` with Poisson arrivals (`rate` per second; inf: all at once), at most `concurrency` at a time."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(bodies), desc=label, leave=False)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def one(body: dict) -> Result:
            async with limit:
                result = await send(client, base_url + "/v1/chat/completions", {**body, "model": model}, headers)
            bar.update()
            return result

        tasks, start = [], time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(one(body)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))  # the arrival process itself, not a wait for a result
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return results, duration


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))]


def summarize(label: str, results: list[Result], duration: float) -> dict:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    itl = [gap for r in done for gap in r.itl]
    summary = {"requests/s": len(done) / duration, "output tok/s": tokens / duration}
    for name, values in (
        ("TTFT", [r.ttft for r in done]),
        ("TPOT", tpot),
        ("ITL", itl),
        ("E2E", [r.e2e for r in done]),
    ):
        summary[f"{name} p50 ms"] = 1000 * percentile(values, 0.5)
        summary[f"{name} p99 ms"] = 1000 * percentile(values, 0.99)
    print(f"\n== {label}: {len(done)} ok, {len(failed)} failed, {tokens} output tokens in {duration:.2f} s")
    for key, value in summary.items():
        print(f"  {key:<16} {value:10.2f}")
    if failed:
        print(f"  first failure: {failed[0].error}")
    return summary


def bench_model_folder() -> Path:
    """benchmarks/common.py's `bench` config with the demo model's vocabulary and processor, saved once."""
    folder = ROOT / "build" / "serve_bench_model"
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers
    from common import bench_config, ours_sharing, randomize_

    import idefics

    processor = idefics.IdeficsProcessor.from_pretrained(idefics.DEMO_MODEL)
    cfg = bench_config("bench") | dict(vocab_size=len(processor.tokenizer) - 3, additional_vocab_size=3)
    torch.manual_seed(0)
    ref = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**cfg)).eval()
    randomize_(ref)
    ours_sharing(ref, "cpu").save_pretrained(folder)
    processor.image_processor.image_size = cfg["vision_config"]["image_size"]
    processor.save_pretrained(folder)
    return folder


def launch(model: str, *, concurrency: int, queue: int, threads: int, flags: tuple[str, ...] = ()):
    """Start `idefics serve` (with extra `flags`) on a free loopback port; return the process and its base URL once
    healthy."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "idefics", "serve", "--model", model, "--port", "0", "--log-level", "warning",
               "--max-batch-size", str(concurrency), "--max-queue", str(queue), *flags]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # the first line names the address; the model is loaded by then
        if match := re.search(r"on (http://\S+:\d+)", line):
            base_url = match.group(1)
            break
    else:
        raise RuntimeError(f"idefics serve exited with status {proc.wait()}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + "/health").status_code == 200:
                return proc, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("idefics serve did not become healthy within 300 s")


def engine_baseline(model_dir: str, bodies: list[dict], *, concurrency: int, threads: int) -> dict:
    """The same requests straight into an in-process Engine, `concurrency` clients at a time (all at once)."""
    import torch
    from PIL import Image

    from idefics import IdeficsForVisionText2Text, IdeficsProcessor
    from idefics.serving import Engine, EngineConfig, SamplingParams

    torch.set_num_threads(threads)
    model = IdeficsForVisionText2Text.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    processor = IdeficsProcessor.from_pretrained(model_dir)

    def messages(body: dict) -> list[dict]:
        parts = body["messages"][0]["content"]
        image = Image.open(io.BytesIO(base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1])))
        image.load()
        return [{"role": "user", "content": [{"type": "image", "image": image}, parts[1]]}]

    prompts = [(messages(body), body["max_tokens"]) for body in bodies]  # decoded before the clock starts
    config = EngineConfig(max_batch_size=concurrency, max_queue=len(bodies))
    with Engine(model, processor, config) as engine:

        def one(prompt: tuple[list[dict], int]) -> Result:
            start = time.perf_counter()
            params = SamplingParams(max_tokens=prompt[1], temperature=0.0, ignore_eos=True)
            (completion,) = engine.submit(prompt[0], params).result()
            return Result(ok=True, output_tokens=completion.completion_tokens, ttft=completion.timings["ttft"],
                          e2e=time.perf_counter() - start)  # fmt: skip

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(tqdm(pool.map(one, prompts), total=len(prompts), desc="engine", leave=False))
        duration = time.perf_counter() - start
    return summarize(f"engine in-process, {concurrency} at a time", results, duration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--launch", action="store_true", help="start (and stop) an idefics serve subprocess")
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--preset", choices=["demo", "bench"], default="demo", help="the model --launch serves")
    parser.add_argument("--model-name", default="idefics-demo", help="the served model name (with --base-url)")
    parser.add_argument("--api-key", default=os.environ.get("IDEFICS_API_KEY"))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate per second (inf: all)")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64, help="exact output tokens per request (ignore_eos)")
    parser.add_argument("--sequential-requests", type=int, help="requests in the one-at-a-time run (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the launched server and the engine")
    parser.add_argument("--engine-baseline", action="store_true", help="with --launch: also the in-process engine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.engine_baseline and not args.launch:
        parser.error("--engine-baseline needs --launch (the model must be local)")

    bodies = build_requests(args.num_requests, max_tokens=args.max_tokens, seed=args.seed)
    proc, base_url, model_dir = None, args.base_url, None
    if args.launch:
        import idefics

        model_dir = idefics.DEMO_MODEL if args.preset == "demo" else str(bench_model_folder())
        proc, base_url = launch(model_dir, concurrency=args.max_concurrency, queue=args.num_requests,
                                threads=args.threads)  # fmt: skip
    name = args.model_name if args.base_url else None  # a launched server answers to any of its names; None is fine
    try:
        print(f"{args.num_requests} requests, max_tokens={args.max_tokens}, rate={args.request_rate}/s, "
              f"max concurrency {args.max_concurrency}, server {base_url}")  # fmt: skip
        load = summarize(f"load, max concurrency {args.max_concurrency}",
                         *asyncio.run(run_load(base_url, name, bodies, rate=args.request_rate,
                                               concurrency=args.max_concurrency, api_key=args.api_key,
                                               seed=args.seed, label="load")))  # fmt: skip
        few = bodies[: args.sequential_requests or len(bodies)]
        one_by_one = run_load(base_url, name, few, rate=float("inf"), concurrency=1, api_key=args.api_key,
                              seed=args.seed, label="sequential")  # fmt: skip
        sequential = summarize("one at a time", *asyncio.run(one_by_one))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)
    print(f"\noutput tok/s, load / one at a time: {load['output tok/s'] / sequential['output tok/s']:.2f}x")
    if args.engine_baseline:
        engine = engine_baseline(model_dir, bodies, concurrency=args.max_concurrency, threads=args.threads)
        print(f"\noutput tok/s, HTTP / in-process engine at the same load: "
              f"{load['output tok/s'] / engine['output tok/s']:.3f} (HTTP layer cost "
              f"{100 * (1 - load['output tok/s'] / engine['output tok/s']):.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
