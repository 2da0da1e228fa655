"""`idefics eval`: few-shot VQA, captioning or classification evaluation with the IDEFICS protocol.

    idefics eval --task vqa --questions Q.json --annotations A.json --images DIR \\
        --train-questions TQ.json --train-annotations TA.json --train-images TDIR \\
        --shots 0,4,8 --trials 3 --seed 42 --output runs/vqa
    idefics eval --task caption --annotations captions_val2014.json --images val2014 --output runs/coco
    idefics eval --task classification --data test.jsonl --classes classes.txt --output runs/cls

Writes `predictions.jsonl` and `metrics.json` to --output and prints a table; a rerun resumes where it stopped.
The default model is the demo model shipped with the package.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import UserError
from .generate import GROUP_SIZE_HELP, STRICT_HELP, under_torchrun
from .serve import add_tensor_parallel_argument, tensor_parallel_size

TEMPLATE_KEYS = ("base", "instruct")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="few-shot VQA / captioning / classification evaluation",
        description="Evaluate a model few-shot (VQA accuracy, CIDEr, classification accuracy); resumable.",
    )
    p.add_argument("--task", required=True, choices=["vqa", "caption", "classification"])
    p.add_argument("--output", required=True, metavar="DIR", help="predictions.jsonl, metrics.json and run.json")
    p.add_argument("--model", help="a model folder or hub id (default: the demo model shipped with the package)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder to apply to the model")
    p.add_argument("--quantize", choices=["int8", "int4", "nf4"], help="quantise the Linear weights while loading")
    p.add_argument("--group-size", type=int, default=128, help=GROUP_SIZE_HELP + " (default 128)")
    p.add_argument("--quantize-strict", action="store_true", help=STRICT_HELP)
    data = p.add_argument_group("data (VQAv2 / COCO captions or Karpathy JSON / classification JSONL)")
    data.add_argument("--questions", metavar="JSON", help="VQA questions ({'questions': [...]})")
    data.add_argument("--annotations", metavar="JSON", help="VQA annotations, or COCO / Karpathy captions")
    data.add_argument("--images", metavar="DIR", help="the images (file stem = image id, or COCO's *_%%012d)")
    data.add_argument("--split", help="Karpathy split of the queries (e.g. test)")
    data.add_argument("--data", metavar="JSONL", help='classification: {"image", "label"} per line')
    data.add_argument("--classes", metavar="FILE", help="classification: class names, one a line")
    support = p.add_argument_group("support set for the shots (default: the query set, the query excluded)")
    support.add_argument("--train-questions", metavar="JSON")
    support.add_argument("--train-annotations", metavar="JSON")
    support.add_argument("--train-images", metavar="DIR")
    support.add_argument("--train-split", help="Karpathy split of the support set (train includes restval)")
    support.add_argument("--train-data", metavar="JSONL", help="classification support examples")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--shots", default="0,4,8", help="comma-separated numbers of shots (default 0,4,8)")
    proto.add_argument("--trials", type=int, default=3, help="draws of shots per number of shots (default 3)")
    proto.add_argument("--seed", type=int, default=42)
    proto.add_argument("--num-samples", type=int, help="evaluate a random subset of this many queries")
    proto.add_argument("--zero-shot-text-examples", type=int, default=0, metavar="N",
                       help="0-shot: prepend N text-only examples (the IDEFICS paper's 0-shot protocol)")  # fmt: skip
    proto.add_argument("--prompt-style", choices=["auto", "base", "instruct"], default="auto",
                       help="auto: instruct (chat turns) when the tokenizer has <end_of_utterance>")  # fmt: skip
    proto.add_argument("--template", help="base-style template, e.g. '<image>Output:{answer}'")
    proto.add_argument("--instruct-template", help="the user's words of an instruct turn, e.g. '{question}'")
    proto.add_argument("--templates", metavar="YAML", help="a YAML with 'base' and/or 'instruct' (or per task)")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--batch-size", type=int, default=8)
    dec.add_argument("--num-beams", type=int, default=1, help="1 (default): greedy")
    dec.add_argument("--engine", action="store_true", help="generate through the continuous-batching engine (greedy)")
    add_tensor_parallel_argument(dec)
    dec.add_argument("--max-new-tokens", type=int, help="default: 10 for VQA, 20 for captions")
    dec.add_argument(
        "--answer-choices",
        metavar="FILE",
        help="VQA: constrain each answer to one of these, one a line (classification-style questions)",
    )
    dec.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    dec.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    dec.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--shots must be comma-separated numbers, got {text!r}") from None
    if not shots:
        raise UserError("--shots is empty")
    return shots


def read_templates(path: str, task: str) -> dict:
    """{'base': ..., 'instruct': ...} from a YAML file, flat or under the task's name."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"templates file {path!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if isinstance(data, dict) and isinstance(data.get(task), dict):
        data = data[task]
    if not isinstance(data, dict) or not set(data) <= set(TEMPLATE_KEYS) or not data:
        raise UserError(f"{path}: expected a mapping with keys among {list(TEMPLATE_KEYS)} (optionally under {task!r})")
    return data


def run(args: argparse.Namespace) -> int:
    from ..evaluation import DataError, EvalConfig, evaluate, format_table
    from ..evaluation.run import follow
    from ..loading import CheckpointError
    from ..parallel import leave
    from ..parallel.launch import as_rank0

    size = tensor_parallel_size(args)
    templates = read_templates(args.templates, args.task) if args.templates else {}
    for name in ("images", "train_images"):
        folder = getattr(args, name)
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"--{name.replace('_', '-')} folder {folder!r} does not exist")
    try:
        config = EvalConfig(
            task=args.task,
            output=args.output,
            model=args.model,
            adapter=args.adapter,
            quantize=args.quantize,
            group_size=args.group_size,
            quantize_strict=args.quantize_strict,
            questions=args.questions,
            annotations=args.annotations,
            images=args.images,
            data=args.data,
            classes=args.classes,
            split=args.split,
            train_questions=args.train_questions,
            train_annotations=args.train_annotations,
            train_images=args.train_images,
            train_data=args.train_data,
            train_split=args.train_split,
            shots=parse_shots(args.shots),
            trials=args.trials,
            seed=args.seed,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            num_beams=args.num_beams,
            engine=args.engine,
            answer_choices=args.answer_choices,
            max_new_tokens=args.max_new_tokens,
            prompt_style=args.prompt_style,
            template=args.template or templates.get("base"),
            instruct_template=args.instruct_template or templates.get("instruct"),
            zero_shot_text_examples=args.zero_shot_text_examples,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
            tensor_parallel=size > 1 or under_torchrun(),
        )
        if config.tensor_parallel and os.environ.get("RANK", "0") != "0":  # torchrun's other ranks
            follow(config)
            leave()
            return 0
        with as_rank0(size, follow, config, parallel=config.tensor_parallel):
            metrics = evaluate(config)
    except (DataError, CheckpointError, OSError, RuntimeError) as err:
        raise UserError(str(err)) from None
    except ValueError as err:  # bad settings, a prompt too long for the model, ...
        raise UserError(str(err)) from None
    print(format_table(metrics))
    print(f"predictions and metrics in {args.output}")
    return 0
