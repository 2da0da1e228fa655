"""A tiny model folder and chat data for the fine-tuning tests: our model (random, perturbed weights) with the test
tokenizer's vocabulary, processor files at the vision config's image size, and JSONL rows with PNG images."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import config_dict, perturb

from idefics import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessor, IdeficsProcessor
from idefics.modeling.init import init_weights
from idefics.processing import IdeficsTokenizer

# A bias added to every key (attention keys, the perceiver's key norm) shifts all of a query's scores alike, which
# softmax ignores: its gradient is zero up to rounding, and Adam divides that rounding noise by its own size.
GRADIENT_FREE = re.compile(r".*(k_proj\.bias|k_layer_norm\.bias)$")
COLORS = ["red", "green", "blue", "yellow"]
RGB = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20)}


def write_rows(folder: Path, name: str, count: int, *, seed: int) -> Path:
    """`count` chat rows asking for the colour of a one-colour image (with some multi-turn and text-only rows)."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        color = COLORS[int(rng.integers(len(COLORS)))]
        image = f"img/{name}-{i}.png"
        pixels = np.clip(np.array(RGB[color]) + rng.integers(-20, 21, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / image)
        user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Color?"}]}
        messages = [user, {"role": "assistant", "content": f"It is {color}."}]
        if i % 3 == 1:
            messages += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
        lines.append(json.dumps({"messages": messages}))
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def finetune_env(v5_dir, tmp_path_factory):
    """(model folder, train.jsonl, eval.jsonl). The model's vocabulary matches the test tokenizer: 1000 pieces plus
    the three IDEFICS tokens as the decoupled additional rows."""
    folder = tmp_path_factory.mktemp("finetune")
    data = config_dict("resampler_qk_interval2", vocab_size=1000, additional_vocab_size=3, max_position_embeddings=128)
    config = IdeficsConfig.from_dict(data)
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(config)
    init_weights(model, seed=0)
    perturb(model, seed=3)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    image_size = config.vision_config.image_size
    processor = IdeficsProcessor(
        IdeficsImageProcessor.from_pretrained(v5_dir, image_size=image_size), IdeficsTokenizer.from_pretrained(v5_dir)
    )
    processor.save_pretrained(model_dir)
    data_dir = folder / "data"
    data_dir.mkdir()
    return model_dir, write_rows(data_dir, "train", 12, seed=0), write_rows(data_dir, "eval", 4, seed=1)


def assert_weights_close(a: dict, b: dict, tol: float) -> None:
    """Same keys, and every weight with a gradient within `tol`."""
    assert a.keys() == b.keys()
    for key in a:
        if not GRADIENT_FREE.match(key):
            torch.testing.assert_close(a[key], b[key], atol=tol, rtol=0, msg=key)
