"""`idefics generate`: ask a model about images; the answer streams to stdout as it is generated.

    idefics generate --image examples/red_circle.png "What color is the shape?"
    idefics generate --raw --image a.png --image b.png $'User:<image><image>Which?<end_of_utterance>\\nAssistant:'
    idefics generate --image a.png --choice red,blue,green "What color is the shape?"   # or --json-schema / --regex

The default model is the demo model shipped with the package (`idefics.DEMO_MODEL`). Without `--raw` the question
becomes one user turn of the instruct chat format, images first; generation stops at `<end_of_utterance>`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image

from ..loading import CheckpointError
from ..processing.chat import END_OF_UTTERANCE, Text
from ..processing.fetch import UrlPolicy, decode_image, fetch_image, is_url
from ..processing.processor import FAKE_IMAGE_TOKEN, IMAGE_TOKEN
from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer a question about images (streams to stdout)",
        description="Answer a question about images with an IDEFICS model; the answer streams to stdout.",
    )
    p.add_argument("prompt", help="the question; with --raw, the whole prompt, where <image> marks each --image")
    p.add_argument("--model", help="a model folder or hub id (default: the demo model shipped with the package)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (ours or PEFT's) to apply to the model")
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL", help="an image (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as it is instead of as a chat turn")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch --image arguments that are http(s) URLs")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (when sampling)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    structured = p.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid against this schema file")
    structured.add_argument("--regex", metavar="R", help="the answer matches this regular expression")
    structured.add_argument("--choice", metavar="A,B,C", help="the answer is exactly one of these comma-separated")
    add_quantize_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, token counts, timings)")
    p.set_defaults(func=run)


def load_image(source: str, *, allow_remote: bool) -> Image.Image:
    """One --image argument as a decoded PIL image; UserError for a missing file, a non-image or a refused URL."""
    if is_url(source):
        if not allow_remote:
            raise UserError(f"image {source!r} is a URL; pass --allow-remote-images to fetch it")
        try:
            return fetch_image(source, policy=UrlPolicy())
        except ValueError as err:
            raise UserError(str(err)) from None
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"image file {source!r} does not exist" if not path.exists() else f"{source!r} is not a file")
    try:
        return decode_image(path.read_bytes(), source=source)
    except ValueError as err:
        raise UserError(str(err)) from None


def build_prompt(text: str, images: list[Image.Image], *, raw: bool, processor) -> list:
    """The processor's prompt: one chat turn (images, then the question), or the raw text split at `<image>`."""
    if not raw:
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}])
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(images):
        raise UserError(f"the --raw prompt has {len(pieces) - 1} {IMAGE_TOKEN} markers but {len(images)} --image given")
    prompt = [Text(pieces[0])] if pieces[0] else []
    for image, piece in zip(images, pieces[1:], strict=True):
        prompt += [image, Text(piece)] if piece else [image]
    if not prompt:
        raise UserError("the prompt is empty")
    return prompt


def add_quantize_arguments(p) -> None:
    """--quantize, --group-size and --quantize-strict (generate and serve)."""
    p.add_argument(
        "--quantize", choices=["int8", "int4", "nf4"],
        help="quantise the Linear weights while loading (int8: the fast CPU path; int4: group-wise; nf4: QLoRA's)",
    )  # fmt: skip
    p.add_argument("--group-size", type=int, default=128, help=GROUP_SIZE_HELP + " (default 128)")
    p.add_argument("--quantize-strict", action="store_true", help=STRICT_HELP)


GROUP_SIZE_HELP = "int4: input features per scale and zero; a layer it does not divide takes 256/128/64/32, else int8"
STRICT_HELP = "refuse a layer the --group-size does not divide instead of quantising it otherwise"


def load_model(
    name: str,
    *,
    adapter: str | None,
    device: str,
    dtype: torch.dtype | str,
    quantize: str | None = None,
    group_size: int = 128,
    quantize_strict: bool = False,
    tp_plan: str | None = None,
):
    """The model and processor from a folder or hub id, optionally quantised while loading (and sharded over the
    torchrun group with `tp_plan`); UserError when they cannot be found or read, or the quantisation or the
    tensor-parallel split does not fit the model or the device."""
    from ..modeling import IdeficsForVisionText2Text
    from ..processing import IdeficsProcessor
    from ..quantization import QuantizationError

    try:
        model = IdeficsForVisionText2Text.from_pretrained(
            name,
            dtype=dtype,
            device=device,
            quantize=quantize,
            group_size=group_size,
            quantize_strict=quantize_strict,
            tp_plan=tp_plan,
        )
        processor = IdeficsProcessor.from_pretrained(name)
    except QuantizationError as err:
        raise UserError(str(err)) from None
    except FileNotFoundError as err:  # neither a folder nor in the hub cache, or a folder without its files
        raise UserError(str(err)) from None
    except (CheckpointError, OSError, ValueError) as err:  # unreadable or mismatched files
        raise UserError(f"cannot load model {name!r}: {err}") from None
    if adapter is not None:
        try:
            model.load_adapter(adapter)
        except (CheckpointError, OSError, ValueError) as err:
            raise UserError(f"cannot load adapter {adapter!r}: {err}") from None
    return model, processor


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if args.group_size < 1:
        raise UserError(f"--group-size must be at least 1, got {args.group_size}")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise UserError(f"adapter folder {args.adapter!r} does not exist")


def constraint(args: argparse.Namespace):
    """The Constraint --json-schema, --regex or --choice asks for (None without them); UserError when it is bad."""
    from ..generation.constraints import Constraint, ConstraintError

    try:
        if args.json_schema is not None:
            path = Path(args.json_schema)
            if not path.is_file():
                raise UserError(f"--json-schema: the file {args.json_schema!r} does not exist")
            return Constraint.json_schema(path.read_text(encoding="utf-8"), param="--json-schema")
        if args.regex is not None:
            return Constraint.regex(args.regex, param="--regex")
        if args.choice is not None:
            return Constraint.choice([c for c in args.choice.split(",") if c], param="--choice")
    except ConstraintError as err:
        raise UserError(str(err)) from None
    return None


def generation_config(args: argparse.Namespace, tokenizer):
    """Greedy (or sampling with --temperature > 0) until `<end_of_utterance>` or `</s>`; never an image token."""
    from ..generation import GenerationConfig

    stops = [t for t in (END_OF_UTTERANCE, tokenizer.eos_token) if t and tokenizer.backend.token_to_id(t) is not None]
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        eos_token_id=tokenizer.convert_tokens_to_ids(stops),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        bad_words_ids=[[tokenizer.convert_tokens_to_ids(t)] for t in (IMAGE_TOKEN, FAKE_IMAGE_TOKEN)],
        compile=args.compile,
        constraint=constraint(args),
    )


def device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype | str]:
    """--device (default: cuda when available) and --dtype (default: bfloat16 on cuda, float32 on cpu), checked."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise UserError(f"--device {device!r}: {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device!r}: CUDA is not available")
    dtype = DTYPES.get(args.dtype, args.dtype) or (torch.bfloat16 if kind == "cuda" else torch.float32)
    return device, dtype


def under_torchrun() -> bool:
    """Whether torchrun started this process as one of several: the model is then sharded over them (tp_plan)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(args: argparse.Namespace) -> int:
    from .. import DEMO_MODEL
    from ..parallel import leave

    check_args(args)
    images = [load_image(source, allow_remote=args.allow_remote_images) for source in args.image]
    device, dtype = device_and_dtype(args)
    started = time.perf_counter()
    tp_plan = "auto" if under_torchrun() else None
    model, processor = load_model(args.model or DEMO_MODEL, adapter=args.adapter, device=device, dtype=dtype,
                                  quantize=args.quantize, group_size=args.group_size,
                                  quantize_strict=args.quantize_strict, tp_plan=tp_plan)  # fmt: skip
    try:
        return print_answer(args, model, processor, images, device, started)
    finally:
        if tp_plan is not None:
            leave()


def print_answer(args: argparse.Namespace, model, processor, images: list, device: str, started: float) -> int:
    """Generate and print the answer (only rank 0 prints when the model is tensor-parallel)."""
    from ..generation import TextDeltas, generate_steps

    tp = model.tensor_parallel
    prints = tp is None or tp.is_main
    loaded = time.perf_counter()
    inputs = processor(build_prompt(args.prompt, images, raw=args.raw, processor=processor),
                       add_end_of_utterance_token=False).to(device)  # fmt: skip

    # stream_generate's loop, unrolled to count the tokens and time the first one for --json
    deltas, answer, tokens, first_token, finished = TextDeltas(processor.tokenizer), [], 0, None, False
    config = generation_config(args, processor.tokenizer)
    try:
        for step in generate_steps(model, config=config, tokenizer=processor.tokenizer, **inputs):
            tokens, finished = tokens + 1, bool(step.finished[0])
            first_token = first_token or time.perf_counter()
            answer.append(deltas.push(int(step.tokens[0])))
            if prints and not args.json:
                print(answer[-1], end="", flush=True)
    except ValueError as err:  # e.g. a prompt longer than the model's positions
        raise UserError(str(err)) from None
    answer.append(deltas.finish())
    if not prints:
        return 0
    if not args.json:
        print(answer[-1], flush=True)
        return 0
    done = time.perf_counter()
    first_token = first_token or done
    result = {
        "answer": "".join(answer),
        "finish_reason": "stop" if finished else "length",
        "prompt_tokens": int(inputs["attention_mask"].sum()),
        "completion_tokens": tokens,  # the end-of-utterance token included
        "timings": {
            "load_s": round(loaded - started, 4),
            "first_token_s": round(first_token - loaded, 4),
            "decode_s": round(done - first_token, 4),
            "decode_tokens_per_s": round((tokens - 1) / (done - first_token), 2) if tokens > 1 else None,
        },
    }
    print(json.dumps(result, ensure_ascii=False))
    return 0
