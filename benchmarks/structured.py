"""Structured outputs: engine decode tokens/s with a JSON-schema constraint vs free, and grammar compile times.

    python benchmarks/structured.py [--preset bench|tiny|gpu9b] [--new 64] [--rounds 3] [--no-libraries]

The model is the preset's (benchmarks/common.py; random weights, 32,000 + 2 logits for bench); its tokenizer a
synthetic LLaMA-shaped one (SentencePiece-style BPE, byte fallback, 32,000 pieces of words, numbers and JSON
punctuation, plus IDEFICS's 3 added tokens) built here, as no real tokenizer can be downloaded. Prints:

- compile time per schema (cold, its first mask included; then from the cache) and a row's first mask after it;
- with llguidance and xgrammar both installed, a side-by-side on the same vocabulary: import time, compile time
  and mean bitmask time per token along a 64-token random walk through each schema;
- engine steady decode tokens/s at batch 1 and 16, free (EOS ignored) vs every row constrained by a JSON schema
  that cannot complete within --new tokens (so the batch stays full), rounds interleaved, medians, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from engine import PRESETS, build_model

from idefics.generation.constraints import Constraint
from idefics.generation.grammar import GrammarCompiler, fill_bitmask, new_bitmask
from idefics.processing.image import IdeficsImageProcessor
from idefics.processing.processor import IdeficsProcessor
from idefics.processing.tokenizer import IdeficsTokenizer
from idefics.serving import Engine, EngineConfig, SamplingParams
from idefics.serving import engine as engine_module

SCHEMAS = {
    "label": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "shape": {"enum": ["circle", "square", "triangle"]}},
              "required": ["color", "shape"], "additionalProperties": False},
    "receipt": {"type": "object", "properties": {
        "merchant": {"type": "string", "maxLength": 40}, "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "total": {"type": "number", "minimum": 0}, "currency": {"enum": ["EUR", "USD", "GBP"]},
        "items": {"type": "array", "maxItems": 20, "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "price": {"type": "number"}, "qty": {"type": "integer", "minimum": 1}},
            "required": ["name", "price"]}}},
        "required": ["merchant", "total", "items"]},
    # the decode benchmark's: at least 50 records, so no row completes within --new tokens
    "records": {"type": "array", "minItems": 50, "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "color": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}},
        "required": ["id", "color", "name", "ok"], "additionalProperties": False}},
}  # fmt: skip
ADDED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def bench_tokenizer(vocab_size: int, *, seed: int = 0) -> IdeficsTokenizer:
    """A SentencePiece-shaped BPE tokenizer of `vocab_size` pieces (no merges: only the pieces' bytes matter to the
    grammar libraries) with IDEFICS's 3 added tokens after them."""
    from tokenizers import Tokenizer

    from idefics import DEMO_MODEL

    rng = random.Random(seed)
    syllables = "a e i o u ka to ri mu sen pla tion ing er qu ell an de ver os th st re co pro ex ".split()
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", *'{}[]:,"0123456789.-_', '",', '":', '{"', '"}', '["', '"]', "▁{", "▁[", '▁"', "},", "}]"]
    seen = set(pieces)
    while len(pieces) < vocab_size:
        word = "".join(rng.choices(syllables, k=rng.randint(1, 4)))
        kind = rng.random()
        piece = ("▁" + word if kind < 0.6 else word.capitalize() if kind < 0.7 else str(rng.randint(0, 9999))
                 if kind < 0.75 else word)  # fmt: skip
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    data = json.loads((Path(DEMO_MODEL) / "tokenizer.json").read_text())
    data["model"]["vocab"] = {p: i for i, p in enumerate(pieces)}
    data["model"]["merges"] = []
    specials = [t for t in data["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    extra = [dict(specials[0], id=vocab_size + i, content=t) for i, t in enumerate(ADDED)]
    data["added_tokens"] = specials + extra
    return IdeficsTokenizer(Tokenizer.from_str(json.dumps(data)), extra_special_tokens=ADDED)


def compile_times(tokenizer, width: int) -> None:
    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, width)
    print(f"llguidance tokenizer setup ({width} tokens): {1e3 * (time.perf_counter() - start):.1f} ms (once per "
          "tokenizer)")  # fmt: skip
    print(f"{'schema':10} {'compile ms':>10} {'first mask ms':>13} {'cached compile us':>17}")
    for name, schema in SCHEMAS.items():
        constraint = Constraint.json_schema(schema)
        grammar = compiler.compile(constraint)
        state, bitmask = grammar.start([2]), new_bitmask(1, compiler)
        start = time.perf_counter()
        fill_bitmask(bitmask, [(0, state)])
        first = time.perf_counter() - start
        start = time.perf_counter()
        compiler.compile(Constraint.json_schema(schema))
        cached = time.perf_counter() - start
        print(f"{name:10} {1e3 * grammar.seconds:10.2f} {1e3 * first:13.2f} {1e6 * cached:17.1f}")


def allowed(bitmask: torch.Tensor, width: int) -> list[int]:
    bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:width].nonzero().flatten().tolist()


def walk(fill, accept, width: int, bitmask: torch.Tensor, steps: int, seed: int) -> tuple[float, int]:
    """Mean seconds per mask along a random walk of allowed tokens (EOS excluded); the tokens walked."""
    rng, times = random.Random(seed), []
    for _ in range(steps):
        start = time.perf_counter()
        fill(bitmask)
        times.append(time.perf_counter() - start)
        choices = [t for t in allowed(bitmask, width) if t > 2]
        if not choices:
            break
        accept(rng.choice(choices))
    return statistics.fmean(times), len(times)


def libraries(tokenizer, width: int) -> None:
    """llguidance vs xgrammar on the same vocabulary: import, compile and per-token mask times."""
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar is not installed: no side-by-side (pip install xgrammar --no-deps plus apache-tvm-ffi)")
        return
    import llguidance
    import llguidance.torch  # noqa: F401 (its bitmask helpers)

    for lib in ("llguidance", "xgrammar"):
        code = f"import time; t = time.perf_counter(); import {lib}, sys; print(time.perf_counter() - t, " \
               "'transformers' in sys.modules)"  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        print(f"import {lib}: {float(out[0]):.2f} s (imports transformers: {out[1]})")
    raw = tokenizer.backend
    vocab = [raw.id_to_token(i) or "" for i in range(raw.get_vocab_size(with_added_tokens=True))]
    start = time.perf_counter()
    width = max(width, len(vocab))  # both libraries cover every token of the tokenizer
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_FALLBACK, vocab_size=width, stop_token_ids=[2],
                             add_prefix_space=True)  # fmt: skip
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    print(f"xgrammar tokenizer setup: {1e3 * (time.perf_counter() - start):.1f} ms")
    ours = GrammarCompiler(tokenizer, width)
    print(f"{'schema':10} {'llg compile ms':>14} {'xgr compile ms':>14} {'llg mask us':>11} {'xgr mask us':>11}")
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema)
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(ours.tokenizer, Constraint.json_schema(schema).grammar(), log_level=0)
        llg_compile = time.perf_counter() - start
        llg_mask = torch.full((1, ours.words), -1, dtype=torch.int32)
        llg, _ = walk(partial(llguidance.torch.fill_next_token_bitmask, matcher), matcher.consume_token, width,
                      llg_mask, 64, 0)  # fmt: skip
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(", ", ": "))
        xgr_compile = time.perf_counter() - start
        xmatcher = xgr.GrammarMatcher(compiled)
        xgr_mask = xgr.allocate_token_bitmask(1, width)
        xg, _ = walk(xmatcher.fill_next_token_bitmask, xmatcher.accept_token, width, xgr_mask, 64, 0)
        print(f"{name:10} {1e3 * llg_compile:14.2f} {1e3 * xgr_compile:14.2f} {1e6 * llg:11.1f} {1e6 * xg:11.1f}")


def decode_rate(engine: Engine, batch: int, new: int, constraint: Constraint | None, *, vocab: int) -> tuple:
    """Steady decode tokens/s of `batch` requests admitted together (the first token, from the prefill, excluded):
    per wall-clock second and per CPU second of this process (the latter barely moved by other processes)."""
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, constraint=constraint)
    streams = [engine.submit(torch.randint(3, vocab, (32,), generator=g).tolist(), params) for _ in range(batch)]
    engine.step()  # admission: prefill and every first token
    wall, cpu = time.perf_counter(), time.process_time()
    while engine.step():
        pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(c.completion_tokens - 1 for s in streams for c in s.result())
    reasons = [(c.finish_reason, c.error, c.text) for s in streams for c in s.result()]
    assert all(r[0] == "length" for r in reasons), reasons
    return tokens / wall, tokens / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="bench")
    parser.add_argument("--new", type=int, default=64, help="tokens per request in the decode benchmark")
    parser.add_argument("--rounds", type=int, default=4, help="free / constrained rounds, interleaved")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-libraries", action="store_true", help="skip the llguidance / xgrammar side-by-side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model, cfg = build_model(args.preset, preset["device"], preset["dtype"])
    width = cfg["vocab_size"] + cfg["additional_vocab_size"]
    tokenizer = bench_tokenizer(cfg["vocab_size"])
    processor = IdeficsProcessor(IdeficsImageProcessor(), tokenizer)
    print(f"preset {args.preset}: {width} logits, tokenizer {len(tokenizer)} tokens, {args.threads} threads, "
          f"{preset['device']}")  # fmt: skip
    compile_times(tokenizer, width)
    if not args.no_libraries:
        libraries(tokenizer, width)
    constraint = Constraint.json_schema(SCHEMAS["records"])
    batches = [int(b) for b in args.batches.split(",")]
    # No text detokenization on either side, as benchmarks/engine.py runs without a tokenizer: random weights write
    # invalid UTF-8 when free, whose held-back bytes make TextDeltas re-decode a growing tail at every token.
    engine_module.make_deltas = lambda tokenizer, params: None
    engine = Engine(model, processor, EngineConfig(max_batch_size=max(batches), max_model_len=32 + args.new + 1))
    decode_rate(engine, 2, 4, constraint, vocab=cfg["vocab_size"])  # warm-up (first masks, allocator)
    print("decode tokens/s, free vs every row JSON-schema constrained; per wall second | per CPU second of this "
          "process")  # fmt: skip
    print(f"{'batch':>5} {'free':>8} {'json':>8} {'ratio':>6} | {'free':>8} {'json':>8} {'ratio':>6}  wall ratio/round")
    for batch in batches:
        rates = {None: [], constraint: []}
        for r in range(args.rounds):  # interleaved, the order flipped every round
            for c in (None, constraint) if r % 2 == 0 else (constraint, None):
                rates[c].append(decode_rate(engine, batch, args.new, c, vocab=cfg["vocab_size"]))
        cells = []
        for clock in (0, 1):
            free = statistics.median(r[clock] for r in rates[None])
            constrained = statistics.median(r[clock] for r in rates[constraint])
            cells.append(f"{free:8.1f} {constrained:8.1f} {constrained / free:6.3f}")
        rounds = " ".join(f"{c[0] / f[0]:.2f}" for f, c in zip(rates[None], rates[constraint], strict=True))
        print(f"{batch:5d} {cells[0]} | {cells[1]}  {rounds}")


if __name__ == "__main__":
    main()
