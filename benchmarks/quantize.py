"""Decode speed and weight memory of quantised models, side by side in one process: fp32 / bf16 / int8 / int4 (nf4
on request), plus the int4 weight memory of idefics-9b and idefics-80b-shaped models and the 80b batch-16 cache.

    python benchmarks/quantize.py [--preset bench|wide|deep|tiny] [--threads 2] [--reference]   # CPU
    python benchmarks/quantize.py --schemes fp32,int8 --compile both       # the fast CPU path: int8, compiled
    python benchmarks/quantize.py --schemes fp32,int8 --float-head                              # head lever
    python benchmarks/quantize.py --preset 9b --device cuda [--compile]                          # a GPU

Every variant gets the same seeded random weights, built directly in its dtype; quantised variants are built in `--rest`
(what they keep unquantised: the embeddings and norms, and the LM head too with `--float-head`, else it is int8 for
int8 and int4; by default fp32 on the CPU, as `from_pretrained(quantize=)` keeps them, bf16 on a GPU) and quantised
layer by layer, so a 9b model never exists twice. One model is alive at a time, so the variants run one after another
(not interleaved): on a busy machine compare runs of the whole script. `--compile both` measures each model eager and
compiled (`generate(compile=True)`, compile time excluded), interleaved round by round. Decode rates are
(N - 1) / (time(N new tokens) - time(1 new token)), medians of `--repeat` runs. On the CPU, `--reference` adds
transformers' fp32 model on the same shape. The memory figures are exact byte counts of models built on the meta device
with their Linear layers swapped for int4 ones (and the head for an int8 one): nothing is materialised, so they run
anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc

import torch
from common import bench_config, idefics_9b_config, make_inputs, measure, randomize_
from tqdm import tqdm

from idefics import IdeficsConfig, IdeficsForVisionText2Text
from idefics.quantization import QuantizationConfig, quantizable, quantize_model, weight_bytes
from idefics.quantization.kernels import INT4_GROUP_SIZES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def idefics_80b_config() -> dict:
    """idefics-80b's shape: the 9b's vision tower and perceiver under a LLaMA-65B-sized decoder."""
    return idefics_9b_config() | dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                                      num_attention_heads=64, cross_layer_interval=4)  # fmt: skip


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def build(
    cfg: dict, scheme: str, *, device: str, group_size: int, rest: str = "bf16", float_head: bool = False
) -> IdeficsForVisionText2Text:
    """A model with seeded random weights (norms 1, biases 0) in fp32 or bf16; for a quantisation scheme, built in
    `rest` (what stays unquantised: embeddings, norms, with `float_head` the LM head) and quantised in place."""
    with default_dtype(DTYPES.get(scheme, DTYPES[rest])), torch.device("meta"):
        model = IdeficsForVisionText2Text(IdeficsConfig.from_dict(cfg))
    model.to_empty(device=device)
    torch.manual_seed(0)
    randomize_(model)
    for name, p in model.named_parameters():
        if p.ndim == 1 and "alpha" not in name:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)
    if scheme not in DTYPES:
        quantize_model(model, QuantizationConfig(scheme, group_size=group_size, lm_head=False if float_head else None))
    return model.eval()


def largest_group_size(cfg: dict) -> int:
    """The largest int4 group size dividing every quantised layer's in features (kernel sizes first, then 16)."""
    with torch.device("meta"):
        model = IdeficsForVisionText2Text(IdeficsConfig.from_dict(cfg))
    widths = {model.get_submodule(name).in_features for name in quantizable(model)}
    return next(g for g in (*reversed(INT4_GROUP_SIZES), 16, 8, 2) if all(w % g == 0 for w in widths))


def int4_memory(cfg: dict, *, group_size: int) -> int:
    """Bytes of an int4 model of this shape (bf16 embeddings and norms, int8 LM head), counted on the meta device."""
    with default_dtype(torch.bfloat16), torch.device("meta"):
        model = IdeficsForVisionText2Text(IdeficsConfig.from_dict(cfg))
    quantize_model(model, QuantizationConfig("int4", group_size=group_size), device="cuda")  # the target device
    return weight_bytes(model)


def cache_bytes(cfg: dict, *, batch: int, tokens: int, images: int = 1) -> int:
    """bf16 K/V of every decoder layer for `tokens` positions, plus the image K/V of every gated layer."""
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    image_tokens = images * cfg["perceiver_config"]["resampler_n_latents"]
    gated = layers // cfg["cross_layer_interval"]
    return 2 * 2 * d * batch * (layers * tokens + gated * image_tokens)


def memory_report(group_size: int, *, gpu_gb: float = 80, batch: int = 16) -> None:
    """int4 weights of the 9b and 80b shapes, and how long a bf16 batch-16 cache fits next to the 80b on one GPU."""
    gb, eighty_cfg = 1e9, idefics_80b_config()
    nine = int4_memory(idefics_9b_config(), group_size=group_size)
    eighty = int4_memory(eighty_cfg, group_size=group_size)
    images = cache_bytes(eighty_cfg, batch=batch, tokens=0)
    per_token = cache_bytes(eighty_cfg, batch=batch, tokens=1) - images
    room = int((gpu_gb * gb - eighty - images) // per_token)
    print(f"int4 (group {group_size}) weights: idefics-9b {nine / gb:.2f} GB (goal <= 6.5), idefics-80b "
          f"{eighty / gb:.2f} GB; next to the 80b on one {gpu_gb:.0f} GB GPU a bf16 batch-{batch} cache fits "
          f"{room} tokens per row ({per_token * 2048 / gb:.1f} GB would hold 2048)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bench", choices=["bench", "wide", "deep", "tiny", "9b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--schemes", help="comma list of fp32, bf16, int8, int4, nf4 (default: fp32,bf16,int8,int4 "
                        "on the CPU, bf16,int8,int4 on a GPU)")  # fmt: skip
    parser.add_argument("--group-size", type=int, help="int4 group size (default: the largest that fits the preset)")
    parser.add_argument("--rest", choices=list(DTYPES), help="dtype of what quantised models keep unquantised "
                        "(embeddings, norms); default fp32 on the CPU, bf16 on a GPU")  # fmt: skip
    parser.add_argument("--float-head", action="store_true", help="keep the LM head in --rest rather than int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                        help="decode with compile=True (CUDA graphs on a GPU); both: eager and compiled")  # fmt: skip
    parser.add_argument("--reference", action="store_true", help="CPU: add transformers' fp32 model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    schemes = (args.schemes or ("bf16,int8,int4" if cuda else "fp32,bf16,int8,int4")).split(",")
    args.rest = args.rest or ("bf16" if cuda else "fp32")
    cfg = idefics_9b_config() if args.preset == "9b" else bench_config(args.preset)
    group_size = args.group_size or largest_group_size(cfg)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    memory_report(args.group_size or 128)

    n, results, memory = args.new_tokens, {}, {}
    variants = schemes + (["reference"] if args.reference and not cuda else [])
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for name in tqdm(variants, desc="variants"):  # one model alive at a time: a 9b model fits every variant
        if name == "reference":
            import transformers

            torch.manual_seed(0)
            model = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**cfg)).eval()
            randomize_(model)
        else:
            model = build(cfg, name, device=args.device, group_size=group_size, rest=args.rest,
                          float_head=args.float_head)  # fmt: skip
        dtype = (
            torch.float32
            if name in ("fp32", "reference") or (name not in DTYPES and args.rest == "fp32")
            else torch.bfloat16
        )
        labels = {name + (" compiled" if c else ""): c for c in (modes if name != "reference" else [False])}
        for label in labels:
            memory[label], results[label] = weight_bytes(model), {}
        for b in args.batch:
            inputs = make_inputs(cfg, batch=b, prompt=args.prompt, device=args.device, dtype=dtype)

            def generate(k, compiled, model=model, inputs=inputs):
                extra = {"compile": True} if compiled else {}
                with torch.inference_mode():
                    return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, **extra)

            gens = {label: functools.partial(generate, compiled=c) for label, c in labels.items()}
            for label, (t1, tn) in measure(gens, n=n, repeat=args.repeat, sync=sync).items():  # eager, compiled
                results[label][b] = b * (n - 1) / (tn - t1)  # interleaved round by round
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if cuda else f"cpu, {args.threads} threads"
    print(f"\npreset={args.preset} ({device}) prompt={args.prompt} new_tokens={n} int4 group {group_size} "
          f"rest {args.rest} compile {args.compile}")  # fmt: skip
    base = next(iter(results))  # fp32 eager when measured
    header = "".join(f"{f'b{b} tok/s':>11}" for b in args.batch)
    print(
        f"{'':15}{'weights MB':>11}{header}{f'b1 vs {base}':>16}"
        + (f"{'b1 vs ref':>11}" if "reference" in results else "")
    )
    for name, r in results.items():
        row = "".join(f"{r[b]:11.1f}" for b in args.batch)
        ratio = r[args.batch[0]] / results[base][args.batch[0]]
        vs_ref = f"{r[args.batch[0]] / results['reference'][args.batch[0]]:10.2f}x" if "reference" in results else ""
        print(f"{name:15}{memory[name] / 1e6:11.1f}{row}{ratio:11.2f}x{vs_ref}")


if __name__ == "__main__":
    main()
