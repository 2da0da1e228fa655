"""`idefics serve`: an OpenAI-compatible HTTP server (and a browser playground at /) on one engine.

    idefics serve                                     # the demo model on http://127.0.0.1:8000
    idefics serve --model HuggingFaceM4/idefics-9b-instruct --host 0.0.0.0 --api-key "$KEY" --max-batch-size 16

The server keeps no state between requests: run more replicas (same --served-model-name) behind any HTTP load
balancer to scale out. SIGTERM drains: /health turns 503, new requests get 503, requests in flight finish, then the
process exits 0 (a second SIGTERM or SIGINT stops at once).

    idefics serve --model HuggingFaceM4/idefics-80b-instruct --tensor-parallel-size 8   # one model on 8 GPUs
    torchrun --nproc_per_node=8 -m idefics serve --model ...                         # the same, torchrun's ranks

With tensor parallelism this process is rank 0: it serves HTTP and runs the engine's scheduler, and it starts the
other ranks itself (or torchrun does), which follow its engine; SIGTERM drains, then every rank exits.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from .errors import UserError
from .generate import DTYPES, add_quantize_arguments, device_and_dtype, load_model, under_torchrun

DEMO_MODEL_NAME = "idefics-demo"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with a browser playground",
        description="Serve an IDEFICS model over OpenAI's chat and completions API (and a playground at /).",
    )
    p.add_argument("--model", help="a model folder or hub id (default: the demo model shipped with the package)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (ours or PEFT's) to apply to the model")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the model name(s) clients send; replicas of one model should share it"
                   " (default: --model, or 'idefics-demo')")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed at start)")
    p.add_argument("--api-key", default=os.environ.get("IDEFICS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $IDEFICS_API_KEY)")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    add_quantize_arguments(p)
    add_tensor_parallel_argument(p)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (decode slots)")
    p.add_argument("--cache-memory", type=float, metavar="GIB",
                   help="memory for the K/V cache: as many slots as fit, at most --max-batch-size")  # fmt: skip
    p.add_argument(
        "--image-cache-memory",
        type=float,
        metavar="GIB",
        default=0.25,
        help="memory for encoded images kept for reuse, each image encoded once (0: off; default 0.25)",
    )
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt whole (default: a prompt reuses the K/V of the longest prefix a slot "
                   "holds, e.g. a chat's earlier turns)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, help="prompt + generated tokens per request (default: the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which new ones get 429")
    p.add_argument("--max-images-per-request", type=int, default=4)
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="encoded size of one image")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000, help="width x height of one image")
    p.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024, help="request body size")
    p.add_argument("--request-timeout", type=float, help="seconds a request may wait and generate (default: no limit)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (public addresses only, unless --allowed-media-domains)")  # fmt: skip
    p.add_argument("--allowed-media-domains", nargs="+", default=[], metavar="HOST",
                   help="hosts fetched even when they resolve to private or loopback addresses")  # fmt: skip
    p.add_argument("--allowed-local-media-path", metavar="DIR", help="serve file:// image URLs from inside DIR")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def add_tensor_parallel_argument(p) -> None:
    """--tensor-parallel-size (serve and eval)."""
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="shard the model over N processes (one GPU each; gloo on CPU), started by this one; under "
                   "torchrun the size is torchrun's --nproc_per_node")  # fmt: skip


def tensor_parallel_size(args: argparse.Namespace) -> int:
    """The checked --tensor-parallel-size: 1 means none (or torchrun's group, which needs no flag)."""
    size = args.tensor_parallel_size
    if size < 1:
        raise UserError(f"--tensor-parallel-size must be at least 1, got {size}")
    if size > 1 and under_torchrun():
        raise UserError("--tensor-parallel-size starts its own processes: under torchrun leave it out "
                        "(--nproc_per_node sets the size)")  # fmt: skip
    return size


def check_args(args: argparse.Namespace) -> None:
    positive = ["max_batch_size", "max_queue", "max_images_per_request", "max_image_bytes", "max_image_pixels",
                "max_request_bytes", "max_model_len", "request_timeout", "cache_memory"]  # fmt: skip
    for name in positive:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.image_cache_memory < 0:
        raise UserError(f"--image-cache-memory must be >= 0 (0: off), got {args.image_cache_memory}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        raise UserError(f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a folder")
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise UserError(f"adapter folder {args.adapter!r} does not exist")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err}") from None
    return sock


def build_engine(args: argparse.Namespace, *, tp_plan: str | None = None):
    """The model, processor and (not yet started) engine from the flags (the model sharded with `tp_plan`)."""
    from .. import DEMO_MODEL
    from ..processing import UrlPolicy
    from ..serving import Engine, EngineConfig

    device, dtype = device_and_dtype(args)
    if args.group_size < 1:
        raise UserError(f"--group-size must be at least 1, got {args.group_size}")
    model, processor = load_model(args.model or DEMO_MODEL, adapter=args.adapter, device=device, dtype=dtype,
                                  quantize=args.quantize, group_size=args.group_size,
                                  quantize_strict=args.quantize_strict, tp_plan=tp_plan)  # fmt: skip
    processor.image_processor.url_policy = UrlPolicy(enabled=False)  # the server loads images itself, checked
    try:
        config = EngineConfig(
            max_batch_size=args.max_batch_size,
            cache_memory=max(1, int(args.cache_memory * 2**30)) if args.cache_memory is not None else None,
            max_model_len=args.max_model_len,
            max_queue=args.max_queue,
            max_images_per_request=args.max_images_per_request,
            compile=args.compile,
            image_cache_memory=int(args.image_cache_memory * 2**30),
            prefix_cache=args.prefix_cache,
        )
        return Engine(model, processor, config), processor
    except ValueError as err:  # e.g. --max-model-len beyond the model's positions, a cache too small for one slot
        raise UserError(str(err)) from None


def follow(args: argparse.Namespace) -> None:
    """A rank other than 0: load this rank's shards and replay rank 0's engine until it stops."""
    from ..parallel import leave

    try:
        engine, _ = build_engine(args, tp_plan="auto")
    except UserError:
        sys.exit(2)  # rank 0 loads the same model and reports the error once; it sees this rank's exit code too
    engine.follow()
    leave()


def run(args: argparse.Namespace) -> int:
    from ..parallel.launch import as_rank0

    check_args(args)
    size = tensor_parallel_size(args)
    if under_torchrun() and os.environ.get("RANK", "0") != "0":
        follow(args)
        return 0
    sock = listen(args.host, args.port)  # before any rank starts: a busy port fails at once
    parallel = size > 1 or under_torchrun()
    with as_rank0(size, follow, args, parallel=parallel):
        serve_http(args, sock, tp_plan="auto" if parallel else None)
    return 0


def serve_http(args: argparse.Namespace, sock: socket.socket, *, tp_plan: str | None) -> None:
    """Rank 0 (or the only process): the engine and the HTTP app on `sock`, until SIGTERM has drained them."""
    from ..processing.chat import END_OF_UTTERANCE
    from ..serving.app import ServerConfig, create_app
    from ..serving.media import MediaPolicy
    from ..serving.server import serve

    engine, processor = build_engine(args, tp_plan=tp_plan)
    eou = processor.tokenizer.backend.token_to_id(END_OF_UTTERANCE)
    names = args.served_model_name or [args.model or DEMO_MODEL_NAME]
    config = ServerConfig(
        served_model_names=names,
        api_key=args.api_key or None,
        media=MediaPolicy(
            allow_remote=args.allow_remote_images,
            allowed_domains=tuple(args.allowed_media_domains),
            allowed_local_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
        ),
        max_images_per_request=args.max_images_per_request,
        max_request_bytes=args.max_request_bytes,
        request_timeout=args.request_timeout,
        eos_token_ids=[] if eou is None else [eou],
    )
    app = create_app(engine, config=config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"idefics serve: {names[0]} on http://{shown}:{port} (playground at /)", file=sys.stderr, flush=True)
    serve(app, engine=engine, sock=sock, log_level=args.log_level, drain_timeout=args.request_timeout)
