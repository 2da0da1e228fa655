"""The fine-tuning data pipeline: rows to labelled examples equal to the processor's inputs, bad rows reported with
their line, batches that the model takes as they are."""

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import config_dict, perturb

from idefics import (
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessor,
    IdeficsProcessor,
    IdeficsTokenizer,
    apply_chat_template,
)
from idefics.modeling.init import init_weights
from idefics.processing import UrlPolicy
from idefics.training.data import DataError, SFTDataset, collate

EOU = "<end_of_utterance>"
MAX_BYTES = 4096  # the test processor's limit on image files: the small test images are under it


@pytest.fixture(scope="module")
def processor(v5_dir) -> IdeficsProcessor:
    """The test tokenizer with 28 px images, the vision size of the tiny model configs."""
    image_processor = IdeficsImageProcessor(image_size=28, url_policy=UrlPolicy(max_bytes=MAX_BYTES))
    return IdeficsProcessor(image_processor, IdeficsTokenizer.from_pretrained(v5_dir))


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(path: Path, *, seed: int = 0, size: tuple[int, int] = (20, 14)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise(*size, seed).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Dicts as JSON lines; strings and bytes written as they are (for bad lines)."""
    lines = [
        row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode() for row in rows
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def labelled_runs(processor: IdeficsProcessor, labels: torch.Tensor) -> list[str]:
    """The labelled tokens decoded, one string per run of consecutive labelled positions."""
    runs, current = [], []
    for label in [*labels.tolist(), -100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(processor.decode(current))
            current = []
    return runs


def assert_like_processor(example, processor: IdeficsProcessor, prompt: list) -> None:
    """The example's inputs equal what the processor gives for the same prompt."""
    expected = processor(prompt)
    n = len(example.pixel_values)
    assert torch.equal(example.input_ids, expected.input_ids[0])
    assert torch.equal(example.pixel_values, expected.pixel_values[0, :n])
    assert torch.equal(example.image_attention_mask, expected.image_attention_mask[0, :, :n])


def never_labelled(processor: IdeficsProcessor) -> list[int]:
    tokenizer = processor.tokenizer
    fake = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    return [tokenizer.bos_token_id, tokenizer.pad_token_id, processor.image_token_id, fake]


def test_chat_labels_are_the_assistant_replies(tmp_path, processor):
    image = png(tmp_path / "cat.png")
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image", "image": "cat.png"}]},
        {"role": "assistant", "content": "A cat on the mat."},
        {"role": "user", "content": "And 12345?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Two kittens."}]},
    ]
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, who is that?"}]
    data = SFTDataset(
        write_jsonl(tmp_path / "chat.jsonl", [{"messages": multi}, {"messages": single}]), processor, max_length=128
    )
    assert (data.report.rows, data.report.kept, data.report.skipped) == (2, 2, [])

    first, second = data[0], data[1]
    multi[1]["content"][1]["image"] = Image.open(image)
    assert_like_processor(first, processor, apply_chat_template(multi, add_generation_prompt=False))
    assert_like_processor(second, processor, apply_chat_template(single, add_generation_prompt=False))
    assert labelled_runs(processor, first.labels) == [f"A cat on the mat.{EOU}", f"Two kittens.{EOU}"]
    assert labelled_runs(processor, second.labels) == [f"Hello there, who is that?{EOU}"]
    for example in (first, second):
        labelled = example.labels != -100
        assert torch.equal(example.labels[labelled], example.input_ids[labelled])
        assert not torch.isin(example.labels, torch.tensor(never_labelled(processor))).any()
        assert example.source_line in (1, 2)


def test_prompt_completion_labels(tmp_path, processor):
    image = png(tmp_path / "img.png")
    rows = [
        {"prompt": ["Describe", {"type": "image", "image": "img.png"}, "Answer:"], "completion": " red and blue"},
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": [{"type": "text", "text": "Caption:"}, {"type": "image_url", "image_url": {"url": "img.png"}}],
         "completion": " two kittens"},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    data = SFTDataset(path, processor, max_length=64)
    assert [labelled_runs(processor, data[i].labels) for i in range(3)] == [
        ["red and blue</s>"],
        ["blue.</s>"],
        ["two kittens</s>"],
    ]
    # The completion continues the prompt's last text; the processor gives the same tokens for the joined prompt.
    assert_like_processor(data[0], processor, ["Describe", Image.open(image), "Answer: red and blue</s>"])
    assert_like_processor(data[1], processor, ["The sky is blue.</s>"])
    assert_like_processor(data[2], processor, ["Caption:", Image.open(image), "two kittens</s>"])

    eou = SFTDataset(path, processor, max_length=64, completion_end="end_of_utterance")
    assert labelled_runs(processor, eou[1].labels) == [f"blue.{EOU}"]
    assert_like_processor(eou[0], processor, ["Describe", Image.open(image), f"Answer: red and blue{EOU}"])


def test_loss_on_all(tmp_path, processor):
    png(tmp_path / "img.png")
    image = {"type": "image", "image": "img.png"}
    rows = [
        {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]},
                      {"role": "assistant", "content": "Hello."}]},
        {"prompt": ["Q:", image], "completion": "A."},
    ]  # fmt: skip
    data = SFTDataset(write_jsonl(tmp_path / "all.jsonl", rows), processor, max_length=64, loss_on="all")
    for i in range(2):
        example = data[i]
        skipped = torch.isin(example.input_ids, torch.tensor(never_labelled(processor)))
        assert torch.equal(example.labels, torch.where(skipped, -100, example.input_ids))
        assert skipped[0] and (example.input_ids == processor.image_token_id).sum() == 1
    assert processor.decode(data[0].labels[data[0].labels != -100]).startswith("User:")


def test_truncation_cuts_text_or_skips(tmp_path, processor):
    png(tmp_path / "img.png")
    image = {"type": "image", "image": "img.png"}
    long_text = "the cat sat on the mat " * 12
    rows = [
        {"messages": [{"role": "user", "content": [image, {"type": "text", "text": long_text}]},
                      {"role": "assistant", "content": "Yes."}]},  # the cut takes the whole reply
        {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]},
                      {"role": "assistant", "content": long_text}]},  # the cut takes the end of the reply
        {"messages": [{"role": "user", "content": [{"type": "text", "text": long_text}, image]},
                      {"role": "assistant", "content": "Yes."}]},  # the cut would take the image
        {"prompt": "Short", "completion": " answer."},  # fits
    ]  # fmt: skip
    data = SFTDataset(write_jsonl(tmp_path / "long.jsonl", rows), processor, max_length=32)
    assert data.report.kept == 2 and data.report.truncated == [2]
    assert [line for line, _ in data.report.skipped] == [1, 3]
    assert "no token to learn from within max_length=32" in data.report.skipped[0][1]
    assert "would drop image 0" in data.report.skipped[1][1]

    cut = data[0]
    full = processor(apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": noise(20, 14, 0)}, {"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": long_text}], add_generation_prompt=False))  # fmt: skip
    assert len(cut.input_ids) == 32 and torch.equal(cut.input_ids, full.input_ids[0, :32])
    assert labelled_runs(processor, cut.labels)[0].startswith("the cat sat")
    assert cut.labels[-1] != -100 and cut.image_attention_mask.shape == (32, 1)
    assert "cut 1 to max_length" in data.report.summary()


def test_every_bad_row_is_reported_with_its_line(tmp_path, processor):
    png(tmp_path / "ok.png")
    png(tmp_path / "big.png", size=(64, 64))  # noise does not compress: over MAX_BYTES
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")

    def chat(image: str) -> dict:
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": image}]},
                             {"role": "assistant", "content": "ok"}]}  # fmt: skip

    rows = [
        chat("ok.png"),  # 1
        "{not json",  # 2
        "[1, 2]",  # 3
        {},  # 4
        {"messages": "hello"},  # 5
        chat("missing.png"),  # 6
        chat("corrupt.png"),  # 7
        chat("big.png"),  # 8
        chat("https://example.com/cat.png"),  # 9
        "   ",  # 10: blank, not a row
        {"messages": [{"role": "robot", "content": "beep"}]},  # 11
        {"prompt": "x", "completion": 3},  # 12
        {"messages": [{"role": "user", "content": "hi"}]},  # 13
        {"texts": ["a", None], "images": [None, None]},  # 14
        b'{"prompt": "\xff\xfe", "completion": "x"}',  # 15
        {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "ok"}]},  # 16
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "images": ["ok.png"]},
    ]
    expected = {
        2: "not valid JSON",
        3: "expected an object, got object of type list",
        4: "expected exactly one of 'messages', 'prompt' (with 'completion') or 'texts' (with 'images'), found none",
        5: "'messages' must be a non-empty list",
        6: f"message 0, part 0: image file not found: {tmp_path / 'missing.png'}",
        7: "not a readable image",
        8: f"over the limit of {MAX_BYTES}",
        9: "message 0, part 0: remote image not allowed, pass --allow-remote-images",
        11: "unknown role 'robot'",
        12: "'completion' must be a non-empty string",
        13: "no assistant message",
        14: "position 1: expected a text or an image, got neither",
        15: "not UTF-8",
        16: "an image part with no image, and 'images' holds only 0",
        17: "'images' holds 1 images but the row uses 0",
    }
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    data = SFTDataset(path, processor, max_length=64)
    report = data.report
    assert (report.rows, report.kept, len(data)) == (16, 1, 1)
    assert [line for line, _ in report.skipped] == sorted(expected)
    for line, reason in report.skipped:
        assert expected[line] in reason, (line, reason)
    summary = report.summary()
    assert summary.startswith(f"{path}: kept 1 of 16 rows, skipped 15:") and "line 2: not valid JSON" in summary
    assert summary.endswith("... and 10 more")

    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid JSON")):
        SFTDataset(path, processor, max_length=64, strict=True)


def test_no_usable_row_is_an_error(tmp_path, processor):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"prompt": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{path}: no usable rows")) as err:
        SFTDataset(path, processor, max_length=64)
    assert "line 2: 'completion' must be a non-empty string" in str(err.value)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no usable rows"):
        SFTDataset(tmp_path / "empty.jsonl", processor, max_length=64)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        SFTDataset(tmp_path / "missing.jsonl", processor, max_length=64)
    with pytest.raises(ValueError, match="loss_on must be one of"):
        SFTDataset(path, processor, max_length=64, loss_on="assistant")


def test_image_paths_and_data_urls(tmp_path, processor, monkeypatch):
    relative = png(tmp_path / "data" / "imgs" / "a.png", seed=1)
    absolute = png(tmp_path / "elsewhere" / "b.png", seed=2)
    encoded = "data:image/png;base64," + base64.b64encode(png(tmp_path / "c.png", seed=3).read_bytes()).decode()
    prompt = ["Three:", {"type": "image", "image": "imgs/a.png"}, {"type": "image", "image": str(absolute)},
              {"type": "image_url", "image_url": {"url": encoded}}, "Which?"]  # fmt: skip
    path = write_jsonl(tmp_path / "data" / "rows.jsonl", [{"prompt": prompt, "completion": " The first."}])
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths start at the JSONL file's folder, not here
    example = SFTDataset(path, processor, max_length=64)[0]
    images = [Image.open(p) for p in (relative, absolute, tmp_path / "c.png")]
    assert example.pixel_values.shape == (3, 3, 28, 28)
    assert_like_processor(example, processor, ["Three:", *images, "Which? The first.</s>"])


def test_datasets_folders(tmp_path, processor):
    datasets = pytest.importorskip("datasets", reason="the optional 'datasets' package is not installed")
    first, second = noise(20, 14, 4), noise(16, 24, 5)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
    ]
    chat = datasets.Dataset.from_dict({"messages": [messages], "images": [[first, second]]})
    chat.save_to_disk(tmp_path / "chat")
    example = SFTDataset(tmp_path / "chat", processor, max_length=64)[0]
    resolved = [{"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "What?"},
                                             {"type": "image", "image": second}]}, messages[1]]  # fmt: skip
    assert_like_processor(example, processor, apply_chat_template(resolved, add_generation_prompt=False))
    assert labelled_runs(processor, example.labels) == [f"Two cats.{EOU}"]

    obelics = datasets.Dataset.from_dict(
        {
            "texts": [["A photo:", None, "Two kittens."], [None, "Grass."]],
            "images": [[None, first, None], [second, None]],
        }
    )
    datasets.DatasetDict({"train": obelics}).save_to_disk(tmp_path / "obelics")
    data = SFTDataset(tmp_path / "obelics", processor, max_length=64)
    assert data.report.unit == "row" and len(data) == 2
    assert_like_processor(data[0], processor, ["A photo:", first, "Two kittens.</s>"])
    assert_like_processor(data[1], processor, [second, "Grass.</s>"])
    assert labelled_runs(processor, data[0].labels) == ["A photo:", "Two kittens.</s>"]
    with pytest.raises(DataError, match=r"has no split 'test'; it has \['train'\]"):
        SFTDataset(tmp_path / "obelics", processor, max_length=64, split="test")


@pytest.fixture
def mixed(tmp_path, processor) -> SFTDataset:
    """Rows with no image, one image and two images, of different lengths."""
    png(tmp_path / "a.png", seed=6)
    png(tmp_path / "b.png", seed=7)
    a, b = {"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"}
    rows = [
        {"prompt": "Say hi.", "completion": " Hi."},
        {"prompt": ["What is it?", a], "completion": " A dog running on the ground."},
        {"messages": [{"role": "user", "content": [a, {"type": "text", "text": "and"}, b]},
                      {"role": "assistant", "content": "Two pictures."}]},
    ]  # fmt: skip
    return SFTDataset(write_jsonl(tmp_path / "mixed.jsonl", rows), processor, max_length=64)


def test_collate_pads_on_the_right(mixed, processor):
    examples = [mixed[i] for i in range(3)]
    pad = processor.tokenizer.pad_token_id
    batch = collate(examples, pad_token_id=pad)
    t = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (3, t)
    assert batch["pixel_values"].shape == (3, 2, 3, 28, 28) and batch["image_attention_mask"].shape == (3, t, 2)
    for i, e in enumerate(examples):
        length, n = len(e.input_ids), len(e.pixel_values)
        assert torch.equal(batch["input_ids"][i, :length], e.input_ids)
        assert torch.equal(batch["labels"][i, :length], e.labels)
        assert (batch["input_ids"][i, length:] == pad).all() and (batch["labels"][i, length:] == -100).all()
        assert batch["attention_mask"][i].tolist() == [1] * length + [0] * (t - length)
        assert torch.equal(batch["pixel_values"][i, :n], e.pixel_values)
        assert (batch["pixel_values"][i, n:] == 0).all()
        assert torch.equal(batch["image_attention_mask"][i, :length, :n], e.image_attention_mask)
        assert (
            batch["image_attention_mask"][i, length:].sum() == 0 and batch["image_attention_mask"][i, :, n:].sum() == 0
        )
    assert [len(e.pixel_values) for e in examples] == [0, 1, 2]
    assert collate([examples[0]], pad_token_id=pad)["pixel_values"].shape == (1, 1, 3, 28, 28)  # at least one slot
    again = collate([mixed[i] for i in range(3)], pad_token_id=pad)  # deterministic
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_model_trains_on_a_batch(mixed, processor):
    config = IdeficsConfig.from_dict(
        config_dict("resampler_qk_interval2", vocab_size=1000, additional_vocab_size=3, max_position_embeddings=128)
    )
    assert len(processor.tokenizer) == config.vocab_size + config.additional_vocab_size
    model = IdeficsForVisionText2Text(config)
    init_weights(model, seed=0)  # the constructor leaves some tensors uninitialised (torch.empty)
    perturb(model)
    model.train()
    batch = collate([mixed[i] for i in range(3)], pad_token_id=processor.tokenizer.pad_token_id)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0  # the images matter
