"""The README's Python examples, run on a tiny model whose vocabulary is the fixture tokenizer's."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import config_dict, perturb, save_reference

import idefics

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def hub_like(v5_dir, tmp_path_factory):
    """One folder with a tiny model and the fixture processor (its 3 extra tokens are the additional vocab)."""
    import transformers

    tokenizer = idefics.IdeficsTokenizer.from_pretrained(v5_dir)
    data = config_dict(
        "resampler_qk_interval2",
        vocab_size=1000,
        additional_vocab_size=len(tokenizer) - 1000,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    data["alpha_initializer"] = "zeros"
    ref = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**data))
    perturb(ref)
    folder = save_reference(ref.eval(), tmp_path_factory.mktemp("hub_like"))
    processor = idefics.IdeficsProcessor.from_pretrained(v5_dir)
    processor.image_processor.image_size = 28
    processor.save_pretrained(folder)
    return folder


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(hub_like, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save("photo.jpg")
    user = {"role": "user", "content": [{"type": "image", "image": "photo.jpg"}, {"type": "text", "text": "What?"}]}
    row = {"messages": [user, {"role": "assistant", "content": "A photo."}]}
    Path("train.jsonl").write_text(json.dumps(row) + "\n")  # the fine-tuning example's data
    blocks = code_blocks()
    assert len(blocks) == 7
    namespace: dict = {}
    for block in blocks:
        exec(block.replace('"HuggingFaceM4/idefics-9b-instruct"', repr(str(hub_like))), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert out.strip(), "the examples print the generated text"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and (tmp_path / "my-adapter").is_dir()
    assert namespace["model"].adapter_config is None
    assert namespace["images"].misses == 1 and namespace["images"].bytes > 0  # the image cache example
