"""LoRA training speed and memory, ours vs transformers + peft, side by side in one process.

    python benchmarks/finetune.py [--preset cpu|gpu9b|tiny] [--steps 5] [--batch 2] [--prompt 256]

Both sides train the same thing on the same weights and batch: LoRA (r=16, alpha=32, dropout 0.05) on q/k/v, AdamW,
loss over the label tokens. The base weights are one set of tensors, attached to our model too, so a 9b model fits
once; "peak step memory" is what a training step allocates on top of the weights (activations, gradients, optimizer
state; CUDA only). The reference runs as transformers' Trainer would run it with `bf16=True`: bf16 autocast, peft's
float32 adapters, non-reentrant gradient checkpointing when asked. Steps alternate between the two sides so that drifts
of the machine hit both alike; the figure is the median step.

Presets: `cpu` (the generate benchmark's `bench` config: 512 wide, 8 layers, a 6-layer 384-wide 224 px vision tower,
fp32, batch 2 x 256 tokens), `gpu9b` (idefics-9b-shaped, bf16 base, gradient checkpointing, batch 4 x 512 tokens),
`tiny` (checks the script itself).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import bench_config, idefics_9b_config, make_inputs, randomize_
from tqdm import tqdm

import idefics
from idefics.training import LoraConfig
from idefics.training.step import token_loss_sum

PRESETS = {
    "cpu": dict(config="bench", batch=2, prompt=256, dtype="float32", checkpointing=False),
    "gpu9b": dict(config="9b", batch=4, prompt=512, dtype="bfloat16", checkpointing=True),
    "tiny": dict(config="tiny", batch=2, prompt=32, dtype="float32", checkpointing=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj"]


def build(preset: dict, device: str):
    """The reference with peft's LoRA and ours with our LoRA, sharing the base weights."""
    import peft
    import transformers

    cfg = idefics_9b_config() if preset["config"] == "9b" else bench_config(preset["config"])
    dtype = getattr(torch, preset["dtype"])
    torch.manual_seed(0)
    with torch.device(device):
        ref = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**cfg)).to(dtype)
    randomize_(ref)
    with torch.device("meta"):
        ours = idefics.IdeficsForVisionText2Text(idefics.IdeficsConfig.from_dict(ref.config.to_dict()))
    ours.load_state_dict(ref.state_dict(), assign=True)
    ours.model.rotary_emb.reset_buffers(device)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    ours.add_adapter(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    for p in ours.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as `idefics finetune` keeps them (and as peft autocasts its adapters)
    if preset["checkpointing"]:
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref.enable_input_require_grads()
        ours.gradient_checkpointing_enable()
    return ref.train(), ours.train(), cfg, dtype


def step_fn(model, inputs: dict, labels: torch.Tensor, *, ours: bool, bf16: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=inputs["input_ids"].is_cuda or None)
    device = inputs["input_ids"].device.type

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if ours:
                loss = token_loss_sum(model(**inputs).logits, labels) / (labels[:, 1:] != -100).sum()
            else:
                loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    preset = PRESETS[args.preset] | {k: v for k, v in (("batch", args.batch), ("prompt", args.prompt)) if v}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and args.preset != "cpu" else "cpu"
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ref, ours, cfg, dtype = build(preset, device)
    bf16 = dtype == torch.bfloat16
    inputs = make_inputs(cfg, batch=preset["batch"], prompt=preset["prompt"], device=device, dtype=dtype)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, : preset["prompt"] // 4] = -100  # a prompt without loss, as in instruction tuning
    tokens = int(inputs["attention_mask"].sum())
    trainable = {"ours": ours.num_parameters(only_trainable=True), "ref": ref.get_nb_trainable_parameters()[0]}
    print(f"preset {args.preset} on {device}: batch {preset['batch']} x {preset['prompt']} tokens ({tokens} real), "
          f"{preset['dtype']}, checkpointing {preset['checkpointing']}, trainable {trainable}")  # fmt: skip

    sides = {"ours": step_fn(ours, inputs, labels, ours=True, bf16=bf16),
             "transformers+peft": step_fn(ref, inputs, labels, ours=False, bf16=bf16)}  # fmt: skip
    times = {name: [] for name in sides}
    peaks = {}
    for name, step in sides.items():  # warm-up (optimizer state allocated) and the step's peak memory
        step()
        sync()
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
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in sides:
        line = f"{name:>18}: {med[name] * 1e3:8.1f} ms/step  {tokens / med[name]:9.1f} tok/s"
        if cuda:
            line += f"  peak step memory {peaks[name] / 2**30:6.2f} GiB"
        print(line)
    ratio = med["transformers+peft"] / med["ours"]
    print(
        f"speed-up: {ratio:.2f}x tokens/s"
        + (f"; memory ratio ours/ref {peaks['ours'] / peaks['transformers+peft']:.2f}" if cuda else "")
    )


if __name__ == "__main__":
    main()
