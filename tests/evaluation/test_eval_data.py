"""Data loaders: the image-id -> file rule, the formats, and clear errors for bad input."""

import json
from pathlib import Path

import pytest
from PIL import Image

from idefics.evaluation.data import (
    DataError,
    ImageFolder,
    load_captions,
    load_classification,
    load_vqa,
    read_classes,
)


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def write(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def vqa_files(tmp_path: Path, questions: list, annotations: list) -> tuple[str, str, str]:
    image(tmp_path / "img" / "COCO_val2014_000000000001.jpg")
    image(tmp_path / "img" / "2.png")
    return (
        write(tmp_path / "q.json", {"questions": questions}),
        write(tmp_path / "a.json", {"annotations": annotations}),
        str(tmp_path / "img"),
    )


def answers(word: str) -> list[dict]:
    return [{"answer": word, "answer_id": i + 1} for i in range(10)]


def test_image_id_rule(tmp_path):
    coco = image(tmp_path / "COCO_val2014_000000000042.jpg")
    plain = image(tmp_path / "sub" / "7.png")
    folder = ImageFolder(tmp_path)
    assert folder.find(42, source="test") == coco
    assert folder.find("7", source="test") == plain
    with pytest.raises(DataError, match=r"no image for image_id 5 .* 5\.<ext> or \*_000000000005\.<ext>"):
        folder.find(5, source="test")


def test_vqa_loads_in_question_order(tmp_path):
    q, a, img = vqa_files(
        tmp_path,
        [
            {"image_id": 2, "question": "What?", "question_id": 20},
            {"image_id": 1, "question": "Who?", "question_id": 10},
        ],
        [{"question_id": 10, "image_id": 1, "answers": answers("me")}, {"question_id": 20, "answers": answers("it")}],
    )
    examples = load_vqa(q, a, img)
    assert [e.question_id for e in examples] == [20, 10]
    assert examples[1].answers == ("me",) * 10 and examples[1].image.name == "COCO_val2014_000000000001.jpg"


def test_vqa_missing_image(tmp_path):
    q, a, img = vqa_files(tmp_path, [{"image_id": 3, "question": "What?", "question_id": 30}], [])
    with pytest.raises(DataError, match=r"question_id 30.*no image for image_id 3"):
        load_vqa(q, None, img)


def test_vqa_annotation_without_question(tmp_path):
    q, a, img = vqa_files(
        tmp_path,
        [{"image_id": 1, "question": "What?", "question_id": 10}],
        [{"question_id": 10, "answers": answers("x")}, {"question_id": 99, "answers": answers("y")}],
    )
    with pytest.raises(DataError, match="annotation of question_id 99 has no question"):
        load_vqa(q, a, img)


def test_vqa_question_id_twice(tmp_path):
    q, a, img = vqa_files(
        tmp_path,
        [
            {"image_id": 1, "question": "What?", "question_id": 10},
            {"image_id": 2, "question": "Who?", "question_id": 10},
        ],
        [],
    )
    with pytest.raises(DataError, match=r"question_id 10 appears twice \(entries 0 and 1\)"):
        load_vqa(q, a, img)


def test_vqa_other_errors(tmp_path):
    q, a, img = vqa_files(tmp_path, [{"image_id": 1, "question_id": 10}], [])
    with pytest.raises(DataError, match="entry 0 has no 'question'"):
        load_vqa(q, None, img)
    q, a, img = vqa_files(tmp_path, [{"image_id": 1, "question": "Q", "question_id": 10}], [])
    with pytest.raises(DataError, match="no annotation for question_id 10"):
        load_vqa(q, a, img)
    with pytest.raises(DataError, match="does not exist"):
        load_vqa(str(tmp_path / "nope.json"), None, img)


def test_coco_and_karpathy_captions(tmp_path):
    image(tmp_path / "img" / "COCO_val2014_000000000001.jpg")
    image(tmp_path / "img" / "val2014" / "COCO_val2014_000000000002.jpg")
    coco = write(
        tmp_path / "c.json",
        {
            "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"}, {"id": 2}],
            "annotations": [
                {"image_id": 1, "caption": "A cat."},
                {"image_id": 2, "caption": "A dog."},
                {"image_id": 1, "caption": "Cat."},
            ],
        },
    )
    examples = load_captions(coco, tmp_path / "img")
    assert [(e.image_id, e.captions) for e in examples] == [(1, ("A cat.", "Cat.")), (2, ("A dog.",))]
    karpathy = write(
        tmp_path / "k.json",
        {
            "images": [
                {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "split": "test", "cocoid": 2,
                 "sentences": [{"raw": "A dog."}]},
                {"filename": "COCO_val2014_000000000001.jpg", "split": "restval", "cocoid": 1,
                 "sentences": [{"raw": "A cat."}]},
            ]
        },
    )  # fmt: skip
    assert [e.image_id for e in load_captions(karpathy, tmp_path / "img", split="test")] == [2]
    assert [e.image_id for e in load_captions(karpathy, tmp_path / "img", split="train")] == [1]
    bad = write(tmp_path / "b.json", {"images": [{"id": 1}], "annotations": [{"image_id": 5, "caption": "x"}]})
    with pytest.raises(DataError, match="image id 1 has no caption"):
        load_captions(bad, tmp_path / "img")


def test_classification(tmp_path):
    image(tmp_path / "a.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "a.png", "label": "cat"}) + "\n")
    assert [(e.image_id, e.label) for e in load_classification(data, read_classes(classes))] == [("a.png", "cat")]
    data.write_text(json.dumps({"image": "a.png", "label": "bird"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: label 'bird' is not one of the classes"):
        load_classification(data, ["cat", "dog"])
    data.write_text(json.dumps({"image": "b.png", "label": "cat"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: image file .*b.png.* does not exist"):
        load_classification(data, ["cat", "dog"])
    classes.write_text("cat\ncat\n")
    with pytest.raises(DataError, match="class 'cat' is listed twice"):
        read_classes(classes)
