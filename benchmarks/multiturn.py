"""Multi-turn chat on `idefics serve`, with the image and prefix caches on and off, side by side in one run.

    python benchmarks/multiturn.py [--preset bench|demo] [--replies words|free] [--conversations 16] [--turns 5]
                                   [--max-tokens 16]

Each conversation is a chat about one image of its own, as the `openai` client sends it: every turn resends the
whole history (the image in the first user message, the earlier replies as assistant messages) plus a new question,
streamed, greedy, exactly `--max-tokens` tokens (`ignore_eos`). All conversations run at once, each sending its next
turn when its last reply is complete. The same conversations go to two `idefics serve` processes in turn (one at a
time, so they never share the CPU): `--image-cache-memory 0 --no-prefix-cache` (caches off), then the defaults
(caches on). Prints TTFT of turn 1 and of turns 2-5 (p50 and mean), output tokens/s and the wall time of each,
their gains (times: off / on; throughput: on / off), the servers' cache counters from /metrics, and whether every
reply is the same with the caches on and off.

Presets: `bench` (benchmarks/common.py's CPU config with the demo model's vocabulary, random weights, 224 px images;
built once into build/serve_bench_model, as serve_load.py does), `demo` (the bundled demo model).

`--replies words` (the default) sends OpenAI's `logit_bias` (+100 on each whole-word token that the tokenizer
spells as itself), so the replies are words that survive the round trip through text, as a trained model's do: the
next turn's prompt then holds the reply's own tokens and the prefix cache reaches to its end. With `free` a random
model's replies are arbitrary pieces that the tokenizer spells otherwise (the worst case for a prefix cache), and
each turn prefills its reply again.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import statistics
import time

import httpx
from serve_load import Result, bench_model_folder, launch, percentile, send

QUESTIONS = ["What color is the shape?", "What shape is this?", "Describe the image.", "Is it round?",
             "What is in the picture?", "Where is the shape?"]  # fmt: skip
CACHES_OFF = ("--image-cache-memory", "0", "--no-prefix-cache")


def image_urls(n: int, seed: int) -> list[str]:
    """n distinct rendered shapes as PNG data URIs."""
    from idefics.demo.world import random_scene, render

    rng = random.Random(seed)
    urls = []
    for _ in range(n):
        buffer = io.BytesIO()
        render(random_scene(rng, size=224)).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def word_tokens(model: str) -> list[int]:
    """The tokenizer's whole-word tokens (a space and letters) that it encodes back to themselves."""
    from idefics import IdeficsProcessor

    tokenizer = IdeficsProcessor.from_pretrained(model).tokenizer
    words = []
    for i in range(len(tokenizer)):
        piece = tokenizer.convert_ids_to_tokens(i)
        if piece.startswith("▁") and piece[1:].isalpha() and len(piece) > 2:
            if tokenizer(" " + piece[1:], add_special_tokens=False)["input_ids"] == [i]:
                words.append(i)
    return words


async def conversation(client: httpx.AsyncClient, base_url: str, image: str, questions: list[str],
                       max_tokens: int, bias: dict[str, int] | None) -> list[Result]:  # fmt: skip
    """One chat: each turn resends the history; returns each turn's result."""
    messages, results = [], []
    for turn, question in enumerate(questions):
        content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]
        messages.append({"role": "user", "content": content if turn == 0 else question})
        body = {"messages": list(messages), "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
        if bias:
            body["logit_bias"] = bias
        result = await send(client, base_url + "/v1/chat/completions", body, {})
        if not result.ok:
            raise RuntimeError(f"turn {turn + 1} failed: {result.error}")
        results.append(result)
        messages.append({"role": "assistant", "content": result.text})
    return results


async def run_all(base_url: str, images: list[str], plans: list[list[str]], max_tokens: int,
                  bias: dict[str, int] | None):  # fmt: skip
    limits = httpx.Limits(max_connections=len(images) + 8, max_keepalive_connections=len(images) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        chats = await asyncio.gather(*(conversation(client, base_url, image, plan, max_tokens, bias)
                                       for image, plan in zip(images, plans, strict=True)))  # fmt: skip
        return chats, time.perf_counter() - start


def cache_counters(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(("idefics_image_cache_", "idefics_prefix_cache_")) and not line.startswith("#"):
            name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
            out[name.removeprefix("idefics_").removesuffix("_total")] = value
    return out


def measure(model: str, flags: tuple[str, ...], args, images: list[str], plans: list[list[str]]) -> dict:
    proc, base_url = launch(model, concurrency=args.conversations, queue=4 * args.conversations,
                            threads=args.threads, flags=flags)  # fmt: skip
    try:
        warm = image_urls(1, seed=10_000)  # another image: one-time costs off the clock, nothing reused later
        asyncio.run(run_all(base_url, warm, [plans[0][:2]], args.max_tokens, args.bias))
        chats, seconds = asyncio.run(run_all(base_url, images, plans, args.max_tokens, args.bias))
        counters = cache_counters(base_url)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    first = [chat[0].ttft for chat in chats]
    later = [r.ttft for chat in chats for r in chat[1:]]
    tokens = sum(r.output_tokens for chat in chats for r in chat)
    return {"turn 1 TTFT p50 ms": 1000 * percentile(first, 0.5), "turn 1 TTFT mean ms": 1000 * statistics.fmean(first),
            "turns 2+ TTFT p50 ms": 1000 * percentile(later, 0.5),
            "turns 2+ TTFT mean ms": 1000 * statistics.fmean(later), "output tok/s": tokens / seconds,
            "wall s": seconds, "replies": [[r.text for r in chat] for chat in chats], "counters": counters}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["bench", "demo"], default="bench")
    parser.add_argument(
        "--replies",
        choices=["free", "words"],
        default="words",
        help="words: replies only of whole-word tokens (logit_bias), which survive the round trip",
    )
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import idefics

    model = idefics.DEMO_MODEL if args.preset == "demo" else str(bench_model_folder())
    args.bias = {str(i): 100 for i in word_tokens(model)} if args.replies == "words" else None
    rng = random.Random(args.seed)
    images = image_urls(args.conversations, args.seed)
    plans = [[rng.choice(QUESTIONS) for _ in range(args.turns)] for _ in images]
    off = measure(model, CACHES_OFF, args, images, plans)
    on = measure(model, (), args, images, plans)
    print(f"\npreset={args.preset} replies={args.replies} conversations={args.conversations} turns={args.turns} "
          f"max_tokens={args.max_tokens} threads={args.threads}")  # fmt: skip
    print(f"{'':24}{'caches off':>12}{'caches on':>12}{'gain':>8}")
    for key in ("turn 1 TTFT p50 ms", "turn 1 TTFT mean ms", "turns 2+ TTFT p50 ms", "turns 2+ TTFT mean ms",
                "wall s", "output tok/s"):  # fmt: skip
        gain = on[key] / off[key] if key == "output tok/s" else off[key] / on[key]  # times: off / on
        print(f"{key:24}{off[key]:12.1f}{on[key]:12.1f}{gain:7.2f}x")
    print("caches on, /metrics:", ", ".join(f"{k} {v:g}" for k, v in sorted(on["counters"].items())))
    same = sum(a == b for x, y in zip(off["replies"], on["replies"], strict=True) for a, b in zip(x, y, strict=True))
    print(f"replies identical with the caches on and off: {same}/{args.conversations * args.turns}")


if __name__ == "__main__":
    main()
