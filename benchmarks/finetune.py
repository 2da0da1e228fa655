"""LoRA training speed and memory, ours vs transformers + peft, side by side in one process.

    python benchmarks/finetune.py [--preset cpu|gpu9b|tiny] [--steps 5] [--batch 2] [--prompt 256] [--compile]
                                  [--label-fraction 0.75]

Both sides train the same thing on the same weights and batch: LoRA (r=16, alpha=32, dropout 0.05) on q/k/v, AdamW,
loss over the label tokens. The base weights are one set of tensors, attached to our model too, so a 9b model fits
once; "peak step memory" is what a training step allocates on top of the weights (activations, gradients, optimizer
state; CUDA only). The reference runs as transformers' Trainer would run it with `bf16=True`: bf16 autocast, peft's
float32 adapters, non-reentrant gradient checkpointing when asked. Steps alternate between the two sides so that drifts
of the machine hit both alike; the figure is the median step. `--compile` adds ours with each layer compiled
(`idefics finetune --compile`), measured after warm-up steps that compile it. Ours applies the LM head only where a
token has a label (`return_logits=False`), so its lead grows as `--label-fraction` falls: report several.

Presets: `cpu` (the generate benchmark's `bench` config: 512 wide, 8 layers, a 6-layer 384-wide 224 px vision tower,
fp32, batch 2 x 256 tokens), `gpu9b` (idefics-9b-shaped, bf16 base, gradient checkpointing, batch 4 x 512 tokens),
`tiny` (checks the script itself).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import bench_config, idefics_9b_config, make_inputs, ours_sharing, randomize_
from tqdm import tqdm

from idefics.modeling.loss import causal_lm_loss
from idefics.training import LoraConfig
from idefics.training.loop import compile_layers

PRESETS = {
    "cpu": dict(config="bench", batch=2, prompt=256, dtype="float32", checkpointing=False),
    "gpu9b": dict(config="9b", batch=4, prompt=512, dtype="bfloat16", checkpointing=True),
    "tiny": dict(config="tiny", batch=2, prompt=32, dtype="float32", checkpointing=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj"]
REF = "transformers+peft"


def build(preset: dict, device: str, *, compiled: bool):
    """The reference with peft's LoRA, ours with our LoRA and, with `compiled`, ours again with compiled layers; all
    share the base weights."""
    import peft
    import transformers

    cfg = idefics_9b_config() if preset["config"] == "9b" else bench_config(preset["config"])
    dtype = getattr(torch, preset["dtype"])
    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**cfg)).to(dtype)
    randomize_(ref)
    models = {}
    for name in ["ours", "ours+compile"] if compiled else ["ours"]:
        model = ours_sharing(ref, device)
        model.add_adapter(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # as `idefics finetune` keeps them (and as peft autocasts its adapters)
        if preset["checkpointing"]:
            model.gradient_checkpointing_enable()
        if name == "ours+compile":
            compile_layers(model)
        models[name] = model.train()
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    if preset["checkpointing"]:
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref.enable_input_require_grads()
    models[REF] = ref.train()
    return models, cfg, dtype


def step_fn(model, inputs: dict, labels: torch.Tensor, *, bf16: bool, ours: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=inputs["input_ids"].is_cuda or None)
    device = inputs["input_ids"].device.type

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if ours:  # as `idefics finetune` computes it: the LM head only where there is a label
                loss = model(**inputs, labels=labels, return_logits=False).loss
            else:  # the reference's own loss fails with additional_vocab_size > 0 (README): the same formula
                loss = causal_lm_loss(model(**inputs).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def profile(name: str, step, sync) -> None:
    """One step under torch.profiler: the busiest operators by device (or CPU) time, and the step's totals."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        step()
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) / 1e3
    print(f"--- {name}: {total:.1f} ms of {'device' if cuda else 'CPU'} time in one step")
    print(events.table(sort_by=key, row_limit=18, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--label-fraction", type=float, default=0.75, help="share of tokens with a loss (answers)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also ours with compiled layers (finetune --compile)")
    parser.add_argument("--profile", action="store_true", help="print each side's top kernels for one step")
    args = parser.parse_args()
    preset = PRESETS[args.preset] | {k: v for k, v in (("batch", args.batch), ("prompt", args.prompt)) if v}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and args.preset != "cpu" else "cpu"
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    models, cfg, dtype = build(preset, device, compiled=args.compile)
    bf16 = dtype == torch.bfloat16
    inputs = make_inputs(cfg, batch=preset["batch"], prompt=preset["prompt"], device=device, dtype=dtype)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    unlabelled = round(preset["prompt"] * (1 - args.label_fraction))
    labels[:, :unlabelled] = -100  # a prompt without loss, as in instruction tuning
    tokens = int(inputs["attention_mask"].sum())
    trainable = {"ours": models["ours"].num_parameters(only_trainable=True)}
    trainable["ref"] = models[REF].get_nb_trainable_parameters()[0]
    print(f"preset {args.preset} on {device}: batch {preset['batch']} x {preset['prompt']} tokens ({tokens} real), "
          f"{preset['dtype']}, checkpointing {preset['checkpointing']}, {args.label_fraction:.0%} labelled, "
          f"trainable {trainable}")  # fmt: skip

    sides = {name: step_fn(model, inputs, labels, bf16=bf16, ours=name != REF) for name, model in models.items()}
    times = {name: [] for name in sides}
    peaks = {}
    for name, step in sides.items():  # warm-up (optimizer state, compilation) and the step's peak memory
        began = time.perf_counter()
        for _ in range(3 if name == "ours+compile" else 1):  # until every shape and grad mode was compiled
            step()
        sync()
        print(f"{name}: warm-up {time.perf_counter() - began:.1f} s", flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            sync()
            peaks[name] = torch.cuda.max_memory_allocated() - base
    for _ in tqdm(range(args.steps), desc="steps", leave=False):
        for name, step in sides.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    if args.profile:
        for name, step in sides.items():
            profile(name, step, sync)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in sides:
        line = f"{name:>18}: {med[name] * 1e3:8.1f} ms/step  {tokens / med[name]:9.1f} tok/s"
        if cuda:
            line += f"  peak step memory {peaks[name] / 2**30:6.2f} GiB"
        print(line)
    for name in sides:
        if name != REF:
            line = f"{name}: {med[REF] / med[name]:.2f}x the reference's tokens/s"
            print(line + (f", {peaks[name] / peaks[REF]:.2f}x its peak step memory" if cuda else ""))


if __name__ == "__main__":
    main()
