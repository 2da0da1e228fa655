"""Evaluation speed: predictions/s of `idefics eval` against a straightforward transformers loop, side by side.

    python benchmarks/eval.py [--preset bench|tiny] [--threads 2] [--queries 32] [--shots 2] [--batch-size 8] \
        [--questions-per-image 5]

Both sides answer the same few-shot VQA prompts (the demo world's rendered VQA set, shots from its train split) with
the same random-weight model (one set of tensors): ours through `evaluate()` (prompt building, image loading,
batched left-padded greedy generation, post-processing, the metric, predictions.jsonl), the reference as users write
it: one `transformers.IdeficsForVisionText2Text.generate` per query at batch 1 on the same processor's inputs.
A third run is `idefics eval --engine` (the continuous-batching engine with `--batch-size` slots).
Each side generates exactly `--new-tokens` tokens per query (end tokens are held off: random weights would stop at
random places). Prints predictions/s of each side, the speed-up, and how many answers agree (greedy on both sides);
also the process CPU time of each (all threads), whose ratio a machine shared with other work distorts less.

`--questions-per-image k` asks k questions about each image (VQAv2 has about 5), in the queries and in the support
set: ours encodes each image once per run (the image cache, the queries ordered by image), the reference every time;
the query count becomes a multiple of k. Predictions are compared by question id.

Presets: `bench` (benchmarks/common.py's CPU config: 512 wide, 8 layers, a 6-layer 224 px vision tower, fp32),
`tiny` (checks the script itself).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import bench_config, ours_sharing, randomize_
from tqdm import tqdm

from idefics import DEMO_MODEL, IdeficsProcessor
from idefics.demo.eval_sets import write_eval_sets
from idefics.evaluation import EvalConfig, evaluate
from idefics.evaluation.postprocess import clean_answer
from idefics.evaluation.predictor import EnginePredictor, GeneratePredictor
from idefics.evaluation.prompts import TEMPLATES
from idefics.evaluation.run import engine_config, load_sets, prompt_for, select_queries

PRESETS = {"bench": dict(queries=32, shots=2, new_tokens=5), "tiny": dict(queries=6, shots=1, new_tokens=3)}


def reference_loop(model, processor, config: EvalConfig, *, new_tokens: int) -> dict:
    """One batch-1 transformers `generate` per query, as users write it; question id -> answer."""
    queries, support, _ = load_sets(config)
    queries = select_queries(queries, config)
    answers = {}
    for query in tqdm(queries, desc="transformers loop", unit="prediction", disable=not config.progress):
        prompt = prompt_for(config, query, support, shots=config.shots[0], trial=0, template=TEMPLATES["vqa"],
                            style="instruct")  # fmt: skip
        inputs = processor(prompt, add_end_of_utterance_token=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        answers[query.question_id] = clean_answer(processor.decode(out[0, inputs["input_ids"].shape[1] :]), stops=[])
    return answers


def read_answers(output: Path) -> dict:
    rows = [json.loads(row) for row in (output / "predictions.jsonl").read_text().splitlines()]
    return {row["question_id"]: row["prediction"] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, help="VQA questions answered by each side")
    parser.add_argument("--shots", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--questions-per-image", type=int, default=1, help="questions about each image (VQAv2: ~5)")
    parser.add_argument("--no-engine", action="store_true", help="skip the continuous-batching engine's run")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    queries, shots = args.queries or preset["queries"], args.shots if args.shots is not None else preset["shots"]
    new_tokens = args.new_tokens or preset["new_tokens"]
    torch.set_num_threads(args.threads)
    import transformers

    cfg = bench_config(args.preset)
    torch.manual_seed(0)
    reference = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**cfg)).eval()
    randomize_(reference)
    ours = ours_sharing(reference, "cpu").eval()
    processor = IdeficsProcessor.from_pretrained(DEMO_MODEL)  # ids < 404 fit any vocabulary of the presets
    processor.image_processor.image_size = cfg["vision_config"]["image_size"]

    with tempfile.TemporaryDirectory() as tmp:
        k = args.questions_per_image
        root = write_eval_sets(Path(tmp) / "data", val=-(-queries // k), train=max(2 * queries, 8 * k) // k, seed=0,
                               questions_per_image=k)  # fmt: skip
        queries = -(-queries // k) * k
        config = EvalConfig(task="vqa", output=str(Path(tmp) / "out"), questions=str(root / "vqa/val_questions.json"),
                            annotations=str(root / "vqa/val_annotations.json"), images=str(root / "vqa/val"),
                            train_questions=str(root / "vqa/train_questions.json"),
                            train_annotations=str(root / "vqa/train_annotations.json"),
                            train_images=str(root / "vqa/train"), shots=(shots,), trials=1, prompt_style="instruct",
                            batch_size=args.batch_size, max_new_tokens=new_tokens)  # fmt: skip
        predict = GeneratePredictor(ours, processor, max_new_tokens=new_tokens)
        predict.config.min_new_tokens = new_tokens  # hold off end tokens, as on the reference side
        warm = replace(config, output=str(Path(tmp) / "warm-up"), num_samples=2, progress=False)
        evaluate(warm, model=ours, processor=processor, predict=predict)  # one-time costs off the clock, both sides
        reference_loop(reference, processor, warm, new_tokens=new_tokens)
        predict.image_cache.clear()  # a cold run: the warm-up's images are not reused
        start, cpu = time.perf_counter(), time.process_time()
        evaluate(config, model=ours, processor=processor, predict=predict)
        ours_s, ours_cpu = time.perf_counter() - start, time.process_time() - cpu
        ours_answers = read_answers(Path(tmp) / "out")
        image_cache = predict.image_cache
        predict.image_cache = None
        start, cpu = time.perf_counter(), time.process_time()
        evaluate(replace(config, output=str(Path(tmp) / "out-uncached")), model=ours, processor=processor,
                 predict=predict)  # fmt: skip
        uncached_s, uncached_cpu = time.perf_counter() - start, time.process_time() - cpu
        predict.image_cache = image_cache
        assert read_answers(Path(tmp) / "out-uncached") == ours_answers, "the image cache changed a prediction"
        engine_s = engine_cpu = None
        if not args.no_engine:
            config.output, config.engine = str(Path(tmp) / "out-engine"), True
            with EnginePredictor(ours, processor, max_new_tokens=new_tokens,
                                 engine_config=engine_config(config)) as engine:  # fmt: skip
                engine.params.min_tokens = new_tokens
                evaluate(replace(warm, output=str(Path(tmp) / "warm-up-engine")), model=ours, processor=processor,
                         predict=engine)  # fmt: skip
                engine.engine.clear_caches()
                start, cpu = time.perf_counter(), time.process_time()
                evaluate(config, model=ours, processor=processor, predict=engine)
                engine_s, engine_cpu = time.perf_counter() - start, time.process_time() - cpu
            config.output, config.engine = str(Path(tmp) / "out"), False
        start, cpu = time.perf_counter(), time.process_time()
        ref_answers = reference_loop(reference, processor, config, new_tokens=new_tokens)
        ref_s, ref_cpu = time.perf_counter() - start, time.process_time() - cpu

    assert ours_answers.keys() == ref_answers.keys()
    agree = sum(ours_answers[q] == ref_answers[q] for q in ref_answers)
    print(f"\npreset={args.preset} threads={args.threads} queries={queries} shots={shots} new_tokens={new_tokens} "
          f"batch_size={args.batch_size} questions_per_image={args.questions_per_image} (fp32, CPU)")  # fmt: skip
    print(f"{'':24}{'predictions/s':>14}{'seconds':>9}{'CPU s':>9}")
    rows = [("idefics eval", ours_s, ours_cpu), ("  without image cache", uncached_s, uncached_cpu)]
    if engine_s is not None:
        rows.append(("idefics eval --engine", engine_s, engine_cpu))
    rows.append(("transformers loop (b=1)", ref_s, ref_cpu))
    for label, wall, cpu in rows:
        print(f"{label:24}{queries / wall:14.2f}{wall:9.1f}{cpu:9.1f}")
    engine = f", --engine {ref_s / engine_s:.2f}x" if engine_s is not None else ""
    print(f"speed-up {ref_s / ours_s:.2f}x (without image cache {ref_s / uncached_s:.2f}x){engine}; by CPU time "
          f"{ref_cpu / ours_cpu:.2f}x (without image cache {ref_cpu / uncached_cpu:.2f}x); answers agree on "
          f"{agree}/{queries}; the image cache changed no prediction")  # fmt: skip


if __name__ == "__main__":
    main()
