"""`idefics finetune`: LoRA (default) or full fine-tuning on JSONL or `datasets` data; see `idefics.training`.

Values come from, lowest first: FinetuneConfig's defaults, a `--config recipe.yaml`, the flags given. Under
`torchrun --nproc_per_node=N -m idefics finetune ...` each process runs this command and FSDP2 shards the model.
"""

from __future__ import annotations

import argparse
import os

from .errors import UserError
from .generate import GROUP_SIZE_HELP, STRICT_HELP

S = argparse.SUPPRESS  # an absent flag leaves the recipe's (or the default) value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model (LoRA or full) on image-text data",
        description="Fine-tune an IDEFICS model. LoRA by default; --full trains every parameter. "
        "Writes OUTPUT/checkpoint-STEP/ folders, then the adapter (or model), processor files, metrics.jsonl and "
        "loss.png to OUTPUT.",
        argument_default=S,
    )
    io = p.add_argument_group("model, data and output")
    io.add_argument("--config", metavar="RECIPE", help="a YAML (or JSON) file with any of these options as keys")
    io.add_argument("--model", help="base model: a folder or hub id (the local hub cache works offline)")
    io.add_argument("--data", help="training data: a JSONL file, a dataset folder or a hub dataset name")
    io.add_argument("--output", help="output folder")
    io.add_argument("--eval-data", help="evaluation data, same forms as --data")
    io.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs in the data")
    io.add_argument("--strict", action="store_true", help="stop at the first bad or over-long row")
    io.add_argument("--max-length", type=int, help="tokens per row (default 1024)")
    io.add_argument("--loss-on", choices=["completion", "all"], help="label tokens (default: completion)")
    method = p.add_argument_group("what to train")
    method.add_argument("--full", action="store_true", help="train every parameter instead of LoRA adapters")
    method.add_argument(
        "--from-scratch", action="store_true", help="random weights from the model's config.json (with --full)"
    )
    method.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    method.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 32)")
    method.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.05)")
    method.add_argument(
        "--lora-targets", help="comma list of module names (PEFT's suffix match) or a full-match regex "
        "(default q_proj,k_proj,v_proj)"
    )  # fmt: skip
    method.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    method.add_argument("--modules-to-save", help="comma list of whole modules to train and save with the adapter")
    method.add_argument(
        "--quantize", choices=["nf4", "int8", "int4"],
        help="QLoRA: quantise the frozen base while loading and train LoRA over it (with --bf16 "
        "--gradient-checkpointing for QLoRA's setting); the adapter loads onto the full-precision base",
    )  # fmt: skip
    method.add_argument("--group-size", type=int, help=GROUP_SIZE_HELP + " (default 128)")
    method.add_argument("--quantize-strict", action="store_true", help=STRICT_HELP)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-steps", type=int, help="optimizer steps (instead of --epochs)")
    opt.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    opt.add_argument("--batch-size", type=int, help="rows per micro-batch per process (default 1)")
    opt.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    opt.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    opt.add_argument("--warmup", type=int, help="linear warmup steps (default 0)")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0)")
    opt.add_argument("--max-grad-norm", type=float, help="clip the gradient norm; 0 disables (default 1)")
    opt.add_argument("--bf16", action="store_true", help="bfloat16 autocast (float32 master weights)")
    opt.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    opt.add_argument("--compile", action="store_true", help="torch.compile each layer (GPU: faster after warm-up)")
    opt.add_argument("--seed", type=int, help="data order, adapter init, dropout (default 0)")
    opt.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    run = p.add_argument_group("evaluation and checkpoints")
    run.add_argument("--eval-every", type=int, help="steps between evaluations (default: at the end)")
    run.add_argument("--save-every", type=int, help="steps between checkpoints (default: none)")
    run.add_argument("--keep", type=int, help="checkpoints to keep (default 2)")
    run.add_argument(
        "--resume", nargs="?", const=True, metavar="DIR",
        help="continue from the latest complete checkpoint in --output, or from DIR",
    )  # fmt: skip
    run.add_argument("--log-every", type=int, help="steps between progress-bar updates (default 1)")
    p.set_defaults(func=run_finetune)


def config_from_args(args: argparse.Namespace):
    from ..training.config import FinetuneConfig, read_recipe

    values = {}
    recipe = getattr(args, "config", None)
    if recipe is not None:
        values = read_recipe(recipe)
    values |= {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
    config = FinetuneConfig.from_mapping(values, source=recipe or "command line")
    config.validate()
    return config


def run_finetune(args: argparse.Namespace) -> int:
    from ..loading import CheckpointError
    from ..training import finetune

    try:
        config = config_from_args(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        raise UserError(str(err)) from None
    try:
        result = finetune(config)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as err:
        raise UserError(str(err)) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the first process speaks for all
        return 0
    if result.stopped:
        print(f"stopped at step {result.step}; resume with --resume (checkpoint: {result.checkpoint})")
    else:
        print(f"done: {result.step} step{'' if result.step == 1 else 's'}; wrote {result.output}")
    return 0
