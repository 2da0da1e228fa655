"""The demo model and how it is built: the rendered world, the data files, the tokenizer, the shipped model (size,
architecture, transformers loads it with the same logits, >= 95% exact answers on fresh images) and the build driver
end to end on a tiny recipe."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import idefics
from idefics import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
from idefics.demo.build import build, corpus
from idefics.demo.data import write_dataset
from idefics.demo.evaluate import accuracy
from idefics.demo.tokenizer import IDEFICS_SPECIALS, train_tokenizer
from idefics.demo.world import COLORS, JITTER, QUESTIONS, SHAPES, Scene, random_scene, render

DEMO = Path(idefics.DEMO_MODEL)


@pytest.fixture(scope="module")
def demo():
    return IdeficsForVisionText2Text.from_pretrained(DEMO), IdeficsProcessor.from_pretrained(DEMO)


# --- the world ---------------------------------------------------------------------------------------------------


def test_random_scenes_follow_the_world_rules():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(500)]
    for s in scenes:
        left, top, side = s.box
        assert 64 <= s.size <= 512 and all(200 <= c <= 255 for c in s.background)
        assert 0.25 * s.size - 0.5 <= side <= 0.60 * s.size and left + side <= s.size and top + side <= s.size
        assert all(abs(c - base) <= JITTER for c, base in zip(s.rgb, COLORS[s.color], strict=True))
    assert {s.shape for s in scenes} == set(SHAPES) and {s.color for s in scenes} == set(COLORS)
    with pytest.raises(ValueError, match="canvas size"):
        random_scene(rng, size=600)


@pytest.mark.parametrize("shape", SHAPES)
def test_render_draws_one_filled_shape_inside_its_box(shape):
    scene = Scene(size=100, background=(210, 220, 230), shape=shape, color="green", rgb=(30, 170, 50), box=(20, 30, 40))
    pixels = np.asarray(render(scene))  # (h, w, 3)
    is_shape = (pixels == scene.rgb).all(-1)
    assert ((pixels == scene.background).all(-1) | is_shape).all()  # nothing else is drawn
    ys, xs = np.nonzero(is_shape)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (20, 30, 59, 69)  # fills its box edge to edge
    fill = is_shape.sum() / 40**2
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
    assert abs(fill - expected) < 0.06
    if shape == "triangle":  # apex up: one pixel wide at the top, full width at the bottom
        assert is_shape[30].sum() <= 2 and is_shape[69].sum() == 40


def test_answers():
    scene = Scene(size=64, background=(200, 200, 200), shape="circle", color="red", rgb=(220, 30, 30), box=(0, 0, 20))
    assert [scene.answer(q) for q in QUESTIONS] == ["Red.", "A circle.", "A red circle."]
    with pytest.raises(ValueError, match="unknown question"):
        scene.answer("How big is it?")


# --- data and tokenizer ------------------------------------------------------------------------------------------


def test_write_dataset_rows_train_on_the_answer(tmp_path):
    from idefics.training.data import SFTDataset

    cases = write_dataset(tmp_path, name="train", count=6, seed=3)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == len(cases) == 6 and len(list((tmp_path / "img").glob("train-*.png"))) == 6
    processor = IdeficsProcessor(
        idefics.IdeficsImageProcessor(image_size=32), train_tokenizer(corpus(tmp_path / "train.jsonl"))
    )
    dataset = SFTDataset(tmp_path / "train.jsonl", processor, max_length=64)
    for (scene, question), line, example in zip(cases, lines, dataset, strict=True):
        user, assistant = json.loads(line)["messages"]
        assert user["content"][1]["text"] == question and assistant["content"] == scene.answer(question)
        labelled = example.labels[example.labels != -100]
        assert processor.decode(labelled) == f"{scene.answer(question)}<end_of_utterance>"


def test_tokenizer_is_llama_shaped_and_transformers_reads_it_the_same(tmp_path):
    from transformers import AutoProcessor

    rng = random.Random(0)
    scenes = [random_scene(rng, size=64) for _ in range(30)]
    texts = [f"<s>User:<fake_token_around_image><image><fake_token_around_image>{q}<end_of_utterance>\nAssistant: "
             f"{s.answer(q)}<end_of_utterance>\n" for s in scenes for q in QUESTIONS]  # fmt: skip
    tokenizer = train_tokenizer(texts)
    vocab = tokenizer.backend.get_vocab_size(with_added_tokens=False)
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<0x00>")] == [0, 1, 2, 3]
    assert tokenizer.convert_tokens_to_ids(list(IDEFICS_SPECIALS)) == [vocab, vocab + 1, vocab + 2]
    prompt = texts[1].split(" A ")[0]  # "<s>User:...What shape is this?<end_of_utterance>\nAssistant:"
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert tokenizer.encode(texts[1], add_special_tokens=False)[: len(prompt_ids)] == prompt_ids  # no piece spans
    odd = "Ünïcode 😀 and\ttabs, never seen"
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False)) == odd  # byte fallback
    IdeficsProcessor(idefics.IdeficsImageProcessor(image_size=32), tokenizer).save_pretrained(tmp_path)
    reference = AutoProcessor.from_pretrained(tmp_path).tokenizer
    for text in [*texts[:6], odd, "What color is the shape?"]:
        assert reference(text).input_ids == tokenizer.encode(text)
        assert reference.decode(tokenizer.encode(text, add_special_tokens=False)) == tokenizer.decode(
            tokenizer.encode(text, add_special_tokens=False)
        )


# --- the shipped model -------------------------------------------------------------------------------------------


def test_demo_model_is_small_and_has_the_idefics_architecture():
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size <= 25e6, f"the demo model folder is {size / 1e6:.1f} MB"
    config = IdeficsConfig.from_pretrained(DEMO)
    assert config.use_resampler and config.additional_vocab_size == 3 and config.num_cross_layers >= 1
    processor = IdeficsProcessor.from_pretrained(DEMO)
    assert processor.image_processor.image_size == config.vision_config.image_size
    assert processor.tokenizer.convert_tokens_to_ids(list(IDEFICS_SPECIALS)) == [
        config.vocab_size, config.vocab_size + 1, config.vocab_size + 2
    ]  # fmt: skip


def test_demo_model_answers_fresh_images(demo):
    model, processor = demo
    result = accuracy(model, processor, count=150, seed=20240917, sizes=(64, 97, 200, 333, 512), batch_size=150)
    assert result.value >= 0.95, (result.value, result.by_question, result.by_size, result.mistakes[:10])


def test_transformers_loads_the_demo_model_with_the_same_logits(demo):
    import transformers

    model, processor = demo
    reference = transformers.IdeficsForVisionText2Text.from_pretrained(DEMO).eval()
    reference_processor = transformers.IdeficsProcessor.from_pretrained(DEMO)
    image = render(Scene(size=150, background=(240, 230, 210), shape="square", color="purple", rgb=(140, 40, 170),
                         box=(30, 40, 70)))  # fmt: skip
    prompt = ["User:", image, "Describe the image.<end_of_utterance>", "\nAssistant:"]
    ours = processor(prompt, add_end_of_utterance_token=False)
    theirs = reference_processor(text=prompt, add_end_of_utterance_token=False, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = reference(**theirs).logits
        got = model(**ours).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    answer = processor.decode(got[0, -1:].argmax(-1))
    assert answer == "A"  # " A purple square." starts here


# --- the build driver --------------------------------------------------------------------------------------------


def test_build_runs_the_whole_recipe(tmp_path):
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(
        f"model: {tmp_path}/start\ndata: {tmp_path}/data/train.jsonl\neval_data: {tmp_path}/data/eval.jsonl\n"
        f"output: {tmp_path}/model\nfull: true\nfrom_scratch: true\nmax_steps: 2\nbatch_size: 4\nlr: 1.0e-3\n"
        "max_length: 64\n"
    )
    installed = tmp_path / "installed"
    value = build(str(recipe), train_images=12, eval_images=4, check_images=12, seed=0, install=str(installed))
    assert 0 <= value <= 1
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in installed.iterdir()}
    IdeficsForVisionText2Text.from_pretrained(installed)
    with pytest.raises(FileExistsError, match="not written by"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "keep.txt").write_text("mine")
        recipe.write_text(recipe.read_text().replace(f"{tmp_path}/model", f"{tmp_path}/other"))
        build(str(recipe), train_images=12, eval_images=4, check_images=12, seed=0, install=None)
    assert (tmp_path / "other" / "keep.txt").is_file()
