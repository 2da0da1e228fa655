"""`finetune(config)`: the whole fine-tuning run, readable top to bottom.

    set up processes -> load processor, model (+ LoRA), data -> AdamW + warmup/cosine -> (resume) ->
    for each step: train_step, schedule, log, evaluate, checkpoint, stop on SIGTERM/SIGINT -> final save

Precision: with `bf16`, the forward and backward run under bfloat16 autocast. Trainable weights, their gradients
and the optimizer state stay float32 (they are the master weights; bf16 updates of small LoRA or fine-tuning
steps round away). Frozen weights are stored in bfloat16 on one process, halving the base model's memory at no cost
in accuracy since they are never updated; under FSDP, sharded weights stay float32 and FSDP gathers them as bf16.
With `quantize` (QLoRA: "nf4" with bf16 and gradient checkpointing) the frozen Linear weights are quantised while
loading and LoRA trains over them; the adapter is saved as usual and loads onto the full-precision base.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import LoraConfig
from ..config import IdeficsConfig
from ..modeling import IdeficsForVisionText2Text
from ..modeling.init import init_weights
from ..processing import IdeficsProcessor
from . import checkpoint
from .config import FinetuneConfig
from .data import SFTDataset
from .distributed import World, all_sum, repeated_layers, setup, shard, teardown
from .metrics import MetricsLog, plot_loss
from .sampler import BatchPlan
from .schedule import warmup_cosine
from .step import evaluate, train_step


@dataclass
class FinetuneResult:
    output: Path
    step: int  # optimizer steps done in all (including those before a resume)
    losses: list[float]  # the training loss of each step this run made
    eval_loss: float | None
    stopped: bool  # stopped early (signal or `stop`), with a checkpoint to resume from
    checkpoint: Path | None  # the last checkpoint written, if any


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def build_model(config: FinetuneConfig, world: World) -> IdeficsForVisionText2Text:
    """The model to train: loaded (or built from its config with random weights), LoRA added unless `full`."""
    if config.from_scratch:
        with torch.device(world.device):
            model = IdeficsForVisionText2Text(IdeficsConfig.from_pretrained(config.model))
        init_weights(model, seed=config.seed)
    else:
        low_precision = config.bf16 and not config.full and not world.distributed  # frozen weights only
        if config.quantize is not None and world.distributed:
            raise ValueError(f"quantize={config.quantize!r} runs on one process; FSDP shards full-precision weights")
        model = IdeficsForVisionText2Text.from_pretrained(
            config.model,
            dtype=torch.bfloat16 if low_precision else torch.float32,
            device=world.device,
            quantize=config.quantize,
            group_size=config.group_size,
            quantize_strict=config.quantize_strict,
        )
    if config.full:
        model.requires_grad_(True)
    else:
        model.add_adapter(
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.target_modules(),
                use_rslora=config.use_rslora,
                modules_to_save=list(config.modules_to_save) or None,
                base_model_name_or_path=str(config.model),
            )
        )
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # master weights in float32 (see the module docstring)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.compile:
        compile_layers(model)
    if world.distributed:
        shard(model, bf16=config.bf16)
    return model.train()


def compile_layers(model: IdeficsForVisionText2Text) -> None:
    """Regional compilation: each vision, decoder and gated cross-attention layer is compiled in place (names and
    checkpoints are unchanged). Layers of one kind share one graph, so compiling costs three layers' worth, and the
    fused element-wise work and fewer kernel launches keep a GPU busy where eager training waits on the host."""
    for layer in repeated_layers(model):
        layer.compile()


def build_optimizer(model: IdeficsForVisionText2Text, config: FinetuneConfig, device: torch.device):
    """AdamW (fused on CUDA); weight decay on matrices only, never on norms, biases or the tanh gates."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "alpha_" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda" or None)


def resume_point(config: FinetuneConfig, output: Path) -> Path | None:
    """The checkpoint to resume from; refuses to start over on top of an earlier run's checkpoints."""
    if config.resume is True or config.resume == "latest":
        return checkpoint.latest(output)
    if config.resume:
        path = Path(config.resume)
        if not (path / checkpoint.MARKER).is_file():
            raise FileNotFoundError(f"--resume {path}: not a complete checkpoint folder (no {checkpoint.MARKER})")
        return path
    if checkpoint.complete_checkpoints(output):
        raise FileExistsError(f"{output} already holds checkpoints: pass --resume to continue, or another --output")
    return None


class _Signals:
    """While training, SIGTERM and SIGINT ask for a checkpoint and a clean exit instead of killing the process."""

    def __init__(self, stop: threading.Event):
        self.stop, self.previous = stop, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, lambda *_: self.stop.set())
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def finetune(
    config: FinetuneConfig,
    *,
    stop: threading.Event | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Run `config` to the end, or until `stop` is set (or SIGTERM/SIGINT arrives): then a checkpoint is saved and
    the result says `stopped`. `on_step` receives each step's metrics row."""
    config.validate()
    world = setup(config.device)
    try:
        return _run(config, world, stop or threading.Event(), on_step)
    finally:
        teardown(world)


def _run(config: FinetuneConfig, world: World, stop: threading.Event, on_step) -> FinetuneResult:
    output = Path(config.output)
    resume_from = resume_point(config, output)
    seed_everything(config.seed)
    processor = IdeficsProcessor.from_pretrained(config.model)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    data_options = dict(max_length=config.max_length, loss_on=config.loss_on, strict=config.strict)
    data_options["allow_remote_images"] = config.allow_remote_images
    train_set = SFTDataset(config.data, processor, **data_options)
    eval_set = SFTDataset(config.eval_data, processor, **data_options) if config.eval_data else None
    if world.is_main:
        for dataset in filter(None, (train_set, eval_set)):
            print(dataset.report.summary(), file=sys.stderr)
    model = build_model(config, world)

    plan = BatchPlan(len(train_set), config.batch_size, config.grad_accum, world.world_size, world.rank, config.seed)
    total = config.max_steps or max(1, math.ceil((config.epochs or 1) * plan.steps_per_epoch))
    optimizer = build_optimizer(model, config, world.device)
    scheduler = warmup_cosine(optimizer, warmup=config.warmup, total=total)
    start = 0
    if resume_from is not None:
        start = checkpoint.load(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, world=world)["step"]
        if world.is_main:
            print(f"resumed from {resume_from} at step {start}", file=sys.stderr)
    log = MetricsLog(output, resume_step=start) if world.is_main else None
    eval_options = dict(world=world, batch_size=config.batch_size, pad_token_id=pad_id, bf16=config.bf16)

    def save(step: int) -> Path:
        extra = {"epoch": step / plan.steps_per_epoch, "config": config.to_dict()}
        path = checkpoint.save(output, step=step, model=model, optimizer=optimizer, scheduler=scheduler, world=world,
                               extra=extra)  # fmt: skip
        if world.is_main:
            checkpoint.prune(output, keep=config.keep)
        return path

    losses, eval_loss, last_checkpoint, stopped, step = [], None, None, False, start
    bar = tqdm(total=total, initial=start, desc="finetune", unit="step", disable=not world.is_main)
    with _Signals(stop):
        for step in range(start + 1, total + 1):
            began = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            stats = train_step(model, optimizer, train_set, plan.micro_batches(step - 1), world=world,
                               pad_token_id=pad_id, max_grad_norm=config.max_grad_norm, bf16=config.bf16)  # fmt: skip
            scheduler.step()
            elapsed = time.perf_counter() - began
            losses.append(stats.loss)
            row = dict(step=step, epoch=round(step / plan.steps_per_epoch, 4), loss=stats.loss, lr=lr,
                       grad_norm=stats.grad_norm, tokens=stats.tokens, label_tokens=stats.label_tokens,
                       tokens_per_s=round(stats.tokens / elapsed, 1))  # fmt: skip
            if eval_set is not None and ((config.eval_every and step % config.eval_every == 0) or step == total):
                eval_loss = row["eval_loss"] = evaluate(model, eval_set, **eval_options)
            if log is not None:
                log.write(row)
            if on_step is not None:
                on_step(row)
            if step % config.log_every == 0 or step == total:
                bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(step - bar.n)
            if _stop_requested(stop, world) and step < total:
                last_checkpoint, stopped = save(step), True
                break
            if config.save_every and step % config.save_every == 0 and step < total:
                last_checkpoint = save(step)
    bar.close()
    if not stopped:
        write_final(model, processor, config, world, output)
    if log is not None:
        plot_loss(log.read(), output / "loss.png")
    return FinetuneResult(output, step, losses, eval_loss, stopped, last_checkpoint)


def _stop_requested(stop: threading.Event, world: World) -> bool:
    if not world.distributed:
        return stop.is_set()
    return all_sum(world, float(stop.is_set()))[0] > 0


def write_final(model, processor: IdeficsProcessor, config: FinetuneConfig, world: World, output: Path) -> None:
    """OUTPUT/ gets the adapter (LoRA) or a full checkpoint, the processor files and the run's config. Under FSDP
    every process helps gather the weights and the first one writes them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not config.full)
    state = get_model_state_dict(model, options=options)
    if not world.is_main:
        return
    output.mkdir(parents=True, exist_ok=True)
    if config.full:
        model.save_pretrained(output, state_dict=state)
    else:
        model.save_adapter(output, state_dict=state)
    processor.save_pretrained(output)
    (output / "finetune_config.json").write_text(json.dumps(config.to_dict(), indent=2))
