"""Rebuild the demo model from nothing: `python -m idefics.demo` (`make demo-model`).

1. render the training and evaluation data where the recipe's `data` and `eval_data` point;
2. train the tokenizer on the training rows and write the starting folder (the recipe's `model`): `config.json`
   (`demo_config`) and the processor files;
3. run `idefics finetune --config recipes/demo.yaml` (full fine-tuning from random weights);
4. measure the exact-answer rate on fresh scenes; with `--install DIR`, copy the model there with a model card.

The shipped model (`idefics.DEMO_MODEL`) is this command's output: `--install src/idefics/demo_model`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from ..config import IdeficsConfig
from ..processing import IdeficsImageProcessor, IdeficsProcessor
from ..processing.chat import END_OF_UTTERANCE
from ..processing.processor import FAKE_IMAGE_TOKEN, IMAGE_TOKEN
from .data import write_dataset
from .tokenizer import IDEFICS_SPECIALS, train_tokenizer

RECIPE = "recipes/demo.yaml"
IMAGE_SIZE = 64  # the processor resizes every canvas to this side (64 px covers the smallest canvas exactly)
EVAL_SIZES = (64, 128, 200, 256, 384, 512)  # canvas sides of the final accuracy check
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "loss.png")  # fmt: skip
MARKER = ".idefics-demo-build"  # folders holding it were written by this command and may be replaced by it


def demo_config(vocab_size: int) -> IdeficsConfig:
    """The demo architecture: idefics-9b's, about 8,000 times smaller (1.1M parameters, 4.4 MB in float32).

    A ViT (64 px images, 8 px patches), a perceiver resampler (16 latents), a LLaMA decoder with a gated
    cross-attention layer before each decoder layer, and the IDEFICS special tokens in the additional (decoupled)
    embedding rows.
    """
    return IdeficsConfig(
        vocab_size=vocab_size,
        additional_vocab_size=len(IDEFICS_SPECIALS),
        hidden_size=128,
        intermediate_size=336,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        cross_layer_interval=1,
        # From scratch the image path must carry signal from the first step: open gates, and weights large enough
        # that the image part of the perceiver's output is not drowned by its N(0, 1) latents (with the reference's
        # 0.02 the shapes take 2-3 times more steps to learn).
        alpha_initializer="ones",
        alpha_type="float",
        initializer_range=0.1,
        use_resampler=True,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        vision_config=dict(
            embed_dim=64, image_size=IMAGE_SIZE, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=256,
        ),
        perceiver_config=dict(
            use_resampler=True, resampler_n_latents=16, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=32
        ),
    )  # fmt: skip


def corpus(rows_file: Path) -> list[str]:
    """The text of each chat row as the processor sees it, image tokens included (the tokenizer's training text)."""
    texts = []
    for line in rows_file.read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        question = next(part["text"] for part in user["content"] if part["type"] == "text")
        image = FAKE_IMAGE_TOKEN + IMAGE_TOKEN + FAKE_IMAGE_TOKEN
        texts.append(
            f"<s>User:{image}{question}{END_OF_UTTERANCE}\nAssistant: {assistant['content']}{END_OF_UTTERANCE}\n"
        )
    return texts


def fresh_folder(path: Path) -> Path:
    """An empty folder at `path`; an existing one is replaced only when an earlier build wrote it."""
    if path.exists():
        if not (path / MARKER).is_file():
            raise FileExistsError(f"{path} exists and was not written by `python -m idefics.demo`; remove it first")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).touch()
    return path


def prepare(recipe: dict, *, train_images: int, eval_images: int, seed: int) -> IdeficsProcessor:
    """Steps 1 and 2: the data, the tokenizer, and the starting folder the recipe's `model` names."""
    data, eval_data = Path(recipe["data"]), Path(recipe["eval_data"])
    fresh_folder(data.parent)
    write_dataset(data.parent, name=data.stem, count=train_images, seed=seed)
    write_dataset(eval_data.parent, name=eval_data.stem, count=eval_images, seed=seed + 1)
    processor = IdeficsProcessor(IdeficsImageProcessor(image_size=IMAGE_SIZE), train_tokenizer(corpus(data)))
    start = fresh_folder(Path(recipe["model"]))
    processor.save_pretrained(start)
    demo_config(processor.tokenizer.backend.get_vocab_size(with_added_tokens=False)).save_pretrained(start)
    return processor


def model_card(config: IdeficsConfig, *, parameters: int, accuracy, recipe: str, minutes: float) -> str:
    by_question = "\n".join(f"| {q} | {v:.1%} |" for q, v in accuracy.by_question.items())
    by_size = ", ".join(f"{size} px {value:.1%}" for size, value in accuracy.by_size.items())
    v, p = config.vision_config, config.perceiver_config
    return f"""# The idefics demo model

A {parameters:,}-parameter IDEFICS (vision encoder, perceiver resampler, gated cross-attention, decoupled
embeddings) trained from random weights by `python -m idefics.demo` ({recipe}, {minutes:.1f} minutes) on rendered
images of one circle, square or triangle in red, green, blue, yellow, purple or orange on a plain background. It
answers "What color is the shape?", "What shape is this?" and "Describe the image." in the IDEFICS instruct chat
format, and nothing else.

Exact answers on {accuracy.total} fresh images (greedy, stop at `<end_of_utterance>`): **{accuracy.value:.1%}**
({by_size}).

| question | exact |
| --- | --- |
{by_question}

- decoder: width {config.hidden_size}, {config.num_hidden_layers} layers, a gated cross-attention layer before each
- vocabulary: {config.vocab_size} + {config.additional_vocab_size} additional tokens (`{"`, `".join(IDEFICS_SPECIALS)}`)
- vision: {v.image_size} px images, {v.patch_size} px patches, width {v.embed_dim}, {v.num_hidden_layers} layers
- perceiver: {p.resampler_n_latents} latents, depth {p.resampler_depth}

![training loss](loss.png)
"""


def build(
    recipe_path: str, *, train_images: int, eval_images: int, check_images: int, seed: int, install: str | None
) -> float:
    """Steps 1-4; returns the exact-answer rate on `check_images` fresh scenes."""
    import torch

    from ..cli import main as cli_main
    from ..modeling import IdeficsForVisionText2Text
    from ..training.config import read_recipe
    from .evaluate import accuracy

    started = time.perf_counter()
    recipe = read_recipe(recipe_path)
    prepare(recipe, train_images=train_images, eval_images=eval_images, seed=seed)
    print(f"data and tokenizer ready in {time.perf_counter() - started:.0f} s", flush=True)
    output = fresh_folder(Path(recipe["output"]))
    status = cli_main(["finetune", "--config", recipe_path])
    if status:
        raise SystemExit(status)
    minutes = (time.perf_counter() - started) / 60
    print(f"built in {minutes:.1f} min", flush=True)

    model = IdeficsForVisionText2Text.from_pretrained(output)
    processor = IdeficsProcessor.from_pretrained(output)
    torch.manual_seed(0)
    result = accuracy(model, processor, count=check_images, seed=seed + 2, sizes=EVAL_SIZES)
    print(f"exact answers on {result.total} fresh images: {result.value:.1%}", json.dumps(result.by_question))
    for question, expected, answered in result.mistakes[:10]:
        print(f"  {question} expected {expected!r}, answered {answered!r}")
    if install is not None:
        target = Path(install)
        target.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            shutil.copyfile(output / name, target / name)
        parameters = sum(p.numel() for p in model.parameters())
        card = model_card(model.config, parameters=parameters, accuracy=result, recipe=recipe_path, minutes=minutes)
        (target / "README.md").write_text(card)
        print(f"installed in {target}")
    return result.value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idefics.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=RECIPE, help=f"the fine-tuning recipe (default {RECIPE})")
    parser.add_argument("--train-images", type=int, default=16000, help="training rows, one new image each")
    parser.add_argument("--eval-images", type=int, default=256, help="rows of the evaluation loss")
    parser.add_argument("--check-images", type=int, default=300, help="fresh images of the final accuracy check")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rendered data")
    parser.add_argument("--install", metavar="DIR", help="copy the trained model here (e.g. src/idefics/demo_model)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see below)")
    args = parser.parse_args(argv)
    import torch

    # The model's matrices are too small to gain from a second thread, and on a busy machine torch's OpenMP threads
    # spin-wait for each other: on 2 shared cores a training step was 50 times slower with 2 threads than with 1.
    torch.set_num_threads(args.threads)
    build(args.recipe, train_images=args.train_images, eval_images=args.eval_images, check_images=args.check_images,
          seed=args.seed, install=args.install)  # fmt: skip
    return 0
