"""The evaluation driver: `evaluate(EvalConfig(...))`, what `idefics eval` runs.

For each number of shots and each trial, every query gets a prompt with its own randomly drawn shots; the prompts
go through `predict` in batches (with a progress bar) and each post-processed answer is appended to
`<output>/predictions.jsonl` as soon as its batch is done, so a rerun skips what is there (resume). The metrics are
then computed from that file and written to `<output>/metrics.json`:

    {"vqa_accuracy": {"0": {"mean": 41.2, "std": 0.0, "trials": [41.2]}, "4": {...}}}

(`vqa_accuracy` in percent, `cider` × 100, `accuracy` in percent for classification; `std` over trials, population).
0-shot runs one trial (its prompts do not depend on the seed) unless text-only examples are drawn.
`<output>/run.json` records the settings the predictions depend on; a rerun with other settings is refused.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..processing.chat import END_OF_UTTERANCE
from .data import (
    DataError,
    Example,
    example_id,
    load_captions,
    load_classification,
    load_vqa,
    read_classes,
)
from .postprocess import MAX_NEW_TOKENS, clean_answer, stop_strings
from .predictions import PredictionFile
from .prompts import STYLES, TEMPLATES, PromptTemplate, build_prompt, sample_shots

TASKS = ("vqa", "caption", "classification")
METRICS = {"vqa": "vqa_accuracy", "caption": "cider", "classification": "accuracy"}
ID_FIELDS = {"vqa": "question_id", "caption": "image_id", "classification": "image_id"}


@dataclass
class EvalConfig:
    task: str  # one of TASKS
    output: str  # folder for predictions.jsonl, metrics.json, run.json
    model: str | None = None  # folder or hub id; None: the demo model (when no model object is passed)
    adapter: str | None = None  # a LoRA adapter folder
    quantize: str | None = None  # "int8", "int4" or "nf4": weight-only quantisation while loading
    group_size: int = 128  # int4: input features per scale and zero; a layer it does not divide takes another
    quantize_strict: bool = False  # refuse such a layer instead
    # data: VQA (questions, annotations, images), captions (annotations, images), classification (data, classes)
    questions: str | None = None
    annotations: str | None = None
    images: str | None = None
    data: str | None = None  # classification JSONL of {"image", "label"}
    classes: str | None = None  # classification class names, one a line
    split: str | None = None  # Karpathy split of the queries (e.g. "test")
    # the support set the shots come from (default: the query set itself, the query excluded)
    train_questions: str | None = None
    train_annotations: str | None = None
    train_images: str | None = None
    train_data: str | None = None
    train_split: str | None = None  # Karpathy split of the support set (e.g. "train", which includes "restval")
    shots: tuple[int, ...] = (0, 4, 8)
    trials: int = 3  # few-shot trials, each with its own draw of shots
    seed: int = 42
    num_samples: int | None = None  # a random subset of this many queries (the same for every shots and trial)
    batch_size: int = 8  # rows generated together (the engine's decode slots with `engine`)
    num_beams: int = 1  # 1: greedy
    engine: bool = False  # generate through the continuous-batching engine (greedy only)
    # the model sharded over this many processes (idefics.parallel): the engine runs on rank 0, the others follow
    tensor_parallel: bool = False
    answer_choices: str | None = None  # vqa: a file of answers, one a line; generation is constrained to them
    max_new_tokens: int | None = None  # default per task (MAX_NEW_TOKENS)
    prompt_style: str = "auto"  # "auto" (instruct when the tokenizer has <end_of_utterance>), "base", "instruct"
    template: str | None = None  # base-style template (see prompts.py); default per task
    instruct_template: str | None = None  # the user's words of an instruct-style turn; default per task
    zero_shot_text_examples: int = 0  # 0-shot: this many text-only examples first (the paper's protocol)
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # float32, bfloat16, float16; default: bfloat16 on cuda, float32 on cpu
    progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        self.shots = tuple(int(k) for k in self.shots)
        if not self.shots or any(k < 0 for k in self.shots):
            raise ValueError(f"shots must be non-negative numbers, got {list(self.shots)}")
        for name in ("trials", "batch_size", "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.zero_shot_text_examples < 0:
            raise ValueError(f"zero_shot_text_examples must be >= 0, got {self.zero_shot_text_examples}")
        if self.tensor_parallel:
            if self.task == "classification":
                raise ValueError("classification scores the classes with forward passes on one process: evaluate it "
                                 "without tensor parallelism")  # fmt: skip
            self.engine = True  # the other ranks follow rank 0's engine
        if self.engine and self.num_beams > 1:
            raise ValueError("the engine decodes greedily: use num_beams=1 with engine=True (and tensor parallelism)")
        if self.answer_choices is not None and (self.task != "vqa" or self.num_beams > 1):
            raise ValueError("answer_choices constrains greedy VQA answers: use it with task 'vqa' and num_beams=1")
        if self.prompt_style not in ("auto", *STYLES):
            raise ValueError(f"prompt_style must be 'auto', 'base' or 'instruct', got {self.prompt_style!r}")
        required = {"vqa": ("questions", "images"), "caption": ("annotations", "images"),
                    "classification": ("data", "classes")}[self.task]  # fmt: skip
        for name in required:
            if getattr(self, name) is None:
                raise ValueError(f"task {self.task!r} needs {name} (--{name.replace('_', '-')})")

    def template_for_task(self) -> PromptTemplate:
        default = TEMPLATES[self.task]
        return PromptTemplate(base=self.template or default.base, instruct=self.instruct_template or default.instruct)

    def fingerprint(self) -> dict:
        """The settings the predictions depend on (not shots, trials, batch size, device or output)."""
        skip = {"output", "shots", "trials", "batch_size", "engine", "tensor_parallel", "device", "progress"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


def load_sets(config: EvalConfig) -> tuple[list[Example], list[Example], list[str] | None]:
    """The queries, the support set and (classification) the class names."""
    c = config
    if c.task == "vqa":
        queries = load_vqa(c.questions, c.annotations, c.images)
        if any(not q.answers for q in queries):
            raise DataError(f"the questions {c.questions!r} need --annotations to be scored")
        support = queries
        if c.train_questions is not None:
            if c.train_annotations is None:
                raise DataError("--train-questions needs --train-annotations (the shots show answers)")
            support = load_vqa(c.train_questions, c.train_annotations, c.train_images or c.images)
        return queries, support, None
    if c.task == "caption":
        queries = load_captions(c.annotations, c.images, split=c.split)
        support = queries
        if c.train_annotations is not None or c.train_split is not None:  # Karpathy: one file, two splits
            support = load_captions(c.train_annotations or c.annotations, c.train_images or c.images,
                                    split=c.train_split)  # fmt: skip
        return queries, support, None
    classes = read_classes(c.classes)
    queries = load_classification(c.data, classes)
    support = load_classification(c.train_data, classes) if c.train_data is not None else queries
    return queries, support, classes


def select_queries(queries: list[Example], config: EvalConfig) -> list[Example]:
    if config.num_samples is None or config.num_samples >= len(queries):
        return queries
    keep = sorted(random.Random(config.seed).sample(range(len(queries)), config.num_samples))
    return [queries[i] for i in keep]


def check_run_file(output: Path, config: EvalConfig) -> None:
    """Write run.json, or refuse when the folder holds predictions made with other settings."""
    path = output / "run.json"
    current = config.fingerprint()
    predictions = output / "predictions.jsonl"
    if path.is_file() and predictions.is_file() and predictions.stat().st_size > 0:
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
        if changed:
            name = changed[0]
            raise ValueError(
                f"{str(output)!r} holds predictions made with {name}={before.get(name)!r}, not {current.get(name)!r};"
                " use another --output folder (or delete this one)"
            )
        return
    path.write_text(json.dumps(current, indent=2) + "\n")


def trials_for(config: EvalConfig, shots: int) -> int:
    return 1 if shots == 0 and config.zero_shot_text_examples == 0 else config.trials


def score(task: str, predictions: list[str], queries: list[Example]) -> float:
    if task == "vqa":
        from .vqa_metric import mean_vqa_accuracy

        return mean_vqa_accuracy(predictions, [q.answers for q in queries])
    if task == "caption":
        from .caption_metric import cider

        captions = {q.image_id: p for q, p in zip(queries, predictions, strict=True)}
        return cider(captions, {q.image_id: q.captions for q in queries})
    return 100.0 * sum(p == q.label for p, q in zip(predictions, queries, strict=True)) / len(queries)


def evaluate(
    config: EvalConfig, *, model=None, processor=None, predict: Callable[[list[list]], list[str]] | None = None
) -> dict:
    """Run (or resume) the evaluation; returns the metrics (also written to `<output>/metrics.json`).

    `model` and `processor` default to loading `config.model`; `predict` (prompts -> generated texts) defaults to
    batched `generate()` on them (see `predictor.GeneratePredictor`).
    """
    queries, support, classes = load_sets(config)
    queries = select_queries(queries, config)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    check_run_file(output, config)
    if model is None or processor is None:
        model, processor = load(config)
    style = config.prompt_style
    if style == "auto":
        style = "instruct" if END_OF_UTTERANCE in processor.tokenizer.all_special_tokens else "base"
    template = config.template_for_task()
    stops = stop_strings(template)
    with ExitStack() as stack:
        if predict is None and config.task != "classification":
            predict = stack.enter_context(default_predictor(config, model, processor, stops=stops))
        return run_queries(config, queries, support, classes, predict, model=model, processor=processor,
                           template=template, style=style, stops=stops)  # fmt: skip


@contextmanager
def default_predictor(config: EvalConfig, model, processor, *, stops: list[str]):
    """Batched `generate()`, or the continuous-batching engine with `config.engine` (shut down on exit)."""
    from .predictor import EnginePredictor, GeneratePredictor

    max_new = config.max_new_tokens or MAX_NEW_TOKENS[config.task]
    constraint = None
    if config.answer_choices is not None:  # the answer is exactly one of the listed ones
        from ..generation.constraints import Constraint

        constraint = Constraint.choice(read_classes(config.answer_choices), param="answer_choices")
    if not config.engine:
        yield GeneratePredictor(model, processor, max_new_tokens=max_new, num_beams=config.num_beams,
                                stop_strings=stops, constraint=constraint)  # fmt: skip
        return
    with EnginePredictor(model, processor, max_new_tokens=max_new, stop_strings=stops, constraint=constraint,
                         engine_config=engine_config(config)) as predictor:  # fmt: skip
        yield predictor


ENGINE_CHUNK = 4  # with the engine, prompts go in chunks of this many batches, so that freed slots refill


def engine_config(config: EvalConfig):
    """The engine's settings for `config` (every rank of a tensor-parallel evaluation builds the same)."""
    from ..serving import EngineConfig

    return EngineConfig(max_batch_size=config.batch_size, max_queue=ENGINE_CHUNK * config.batch_size,
                        max_images_per_request=max(config.shots, default=0) + 1)  # fmt: skip


def follow(config: EvalConfig) -> None:
    """A rank other than 0 of a tensor-parallel evaluation: load this rank's shards and replay rank 0's engine."""
    from ..serving import Engine

    model, processor = load(config)
    Engine(model, processor, engine_config(config)).follow()


def run_queries(config: EvalConfig, queries, support, classes, predict, *, model, processor, template, style,
                stops) -> dict:  # fmt: skip
    """Predict what predictions.jsonl lacks, then score it all."""
    output = Path(config.output)
    id_field = ID_FIELDS[config.task]
    store = PredictionFile(output / "predictions.jsonl", id_field=id_field)
    runs = [(k, t) for k in config.shots for t in range(trials_for(config, k))]
    pending = [(k, t, q) for k, t in runs for q in queries if PredictionFile.key(example_id(q), k, t) not in store]
    pending.sort(key=lambda item: str(item[2].image))  # each image's queries together: encoded once (image cache)
    bar = tqdm(total=len(runs) * len(queries), initial=len(runs) * len(queries) - len(pending), unit="prediction",
               desc=f"eval {config.task}", disable=not config.progress)  # fmt: skip
    chunk = config.batch_size * (ENGINE_CHUNK if config.engine else 1)
    for start in range(0, len(pending), chunk):
        batch = pending[start : start + chunk]
        prompts = [prompt_for(config, q, support, shots=k, trial=t, template=template, style=style)
                   for k, t, q in batch]  # fmt: skip
        if config.task == "classification":
            from .classification import predict_class

            answers = [
                predict_class(model, processor, p, classes, style=style, batch_size=config.batch_size) for p in prompts
            ]
            raws = answers
        else:
            raws = predict(prompts)
            answers = [clean_answer(raw, stops=stops) for raw in raws]
        store.append([{id_field: example_id(q), "shots": k, "trial": t, "prediction": a, "raw": r}
                      for (k, t, q), a, r in zip(batch, answers, raws, strict=True)])  # fmt: skip
        bar.update(len(batch))
    bar.close()
    metrics = compute_metrics(config, queries, store)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def prompt_for(config: EvalConfig, query: Example, support: list[Example], *, shots: int, trial: int, template,
               style: str) -> list:  # fmt: skip
    text_only = shots == 0 and config.zero_shot_text_examples > 0
    drawn = sample_shots(support, query, shots=config.zero_shot_text_examples if text_only else shots,
                         seed=config.seed, trial=trial)  # fmt: skip
    return build_prompt(query, drawn, template=template, style=style, text_only_shots=text_only)


def compute_metrics(config: EvalConfig, queries: list[Example], store: PredictionFile) -> dict:
    """{metric: {shots: {"mean", "std", "trials"}}} from the stored predictions of `queries`."""
    table: dict[str, dict] = {}
    for k in config.shots:
        values = []
        for t in range(trials_for(config, k)):
            answers = [store.rows[PredictionFile.key(example_id(q), k, t)]["prediction"] for q in queries]
            values.append(round(score(config.task, answers, queries), 4))
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        table[str(k)] = {"mean": round(statistics.fmean(values), 4), "std": round(std, 4), "trials": values}
    return {METRICS[config.task]: table}


def format_table(metrics: dict) -> str:
    """The metrics as a small text table: one row per number of shots."""
    (name, by_shots), = metrics.items()  # fmt: skip
    lines = [f"{'shots':>5}  {name:>14}  {'std':>7}  trials", f"{'-' * 5}  {'-' * 14}  {'-' * 7}  ------"]
    for shots, entry in by_shots.items():
        trials = ", ".join(f"{v:.2f}" for v in entry["trials"])
        lines.append(f"{shots:>5}  {entry['mean']:>14.2f}  {entry['std']:>7.2f}  {trials}")
    return "\n".join(lines)


def load(config: EvalConfig):
    """The model and processor of `config.model` (default: the demo model) on the configured device and dtype."""
    import torch

    from .. import DEMO_MODEL
    from ..modeling import IdeficsForVisionText2Text
    from ..processing import IdeficsProcessor

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.dtype is not None and config.dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {config.dtype!r}")
    dtype = dtypes.get(config.dtype) or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    name = config.model or DEMO_MODEL
    quantization = dict(quantize=config.quantize, group_size=config.group_size, quantize_strict=config.quantize_strict)
    quantization = quantization if config.quantize else {}
    tp_plan = "auto" if config.tensor_parallel else None
    model = IdeficsForVisionText2Text.from_pretrained(name, dtype=dtype, device=device, tp_plan=tp_plan,
                                                      **quantization).eval()  # fmt: skip
    processor = IdeficsProcessor.from_pretrained(name)
    if config.adapter is not None:
        model.load_adapter(config.adapter)
    return model, processor
