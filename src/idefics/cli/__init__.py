"""The `idefics` command (also `python -m idefics`): one subcommand per job, each a thin layer over a library
function that a notebook can call too.

A subcommand module has `add_parser(subparsers)` (which sets `func` on its parser) and raises `UserError` for
mistakes in what the user asked: those print one line on stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .errors import UserError

SUBCOMMANDS = ("generate", "finetune", "eval", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idefics",
        description="IDEFICS vision-language models: answer questions about images, fine-tune, evaluate, serve.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks hit the same error: rank 0 says it once
            print(f"idefics {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"idefics {args.command}: interrupted", file=sys.stderr)
        return 130
