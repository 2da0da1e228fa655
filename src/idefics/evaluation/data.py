"""Evaluation sets in the formats people have: VQAv2 (also OK-VQA, VizWiz), COCO captions or Karpathy's split
JSON, and a JSONL of `{"image", "label"}` for classification.

Images are found by id: the image of `image_id` N is the file in the images folder whose stem is N, or whose stem
ends in `_` + N zero-padded to 12 digits (COCO's `COCO_val2014_000000000042.jpg`), with any image extension.
Every problem is reported with the file and the item that has it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class DataError(ValueError):
    """Bad or inconsistent evaluation data; the message names the file and the item."""


@dataclass(frozen=True)
class VqaExample:
    question_id: int | str
    image_id: int | str
    question: str
    answers: tuple[str, ...]  # the human answers (ten in VQAv2); empty for a test split without annotations
    image: Path


@dataclass(frozen=True)
class CaptionExample:
    image_id: int | str
    captions: tuple[str, ...]  # the reference captions
    image: Path


@dataclass(frozen=True)
class ClassificationExample:
    image_id: str  # the image path as written in the JSONL (unique per example)
    label: str  # one of the class names
    image: Path


Example = VqaExample | CaptionExample | ClassificationExample


def example_id(example: Example) -> int | str:
    """The id a prediction is stored under: the question id (VQA) or the image id."""
    return example.question_id if isinstance(example, VqaExample) else example.image_id


class ImageFolder:
    """Maps image ids to files in one folder (searched once, recursively)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"images folder {str(self.folder)!r} does not exist")
        self._by_stem: dict[str, Path] = {}
        for path in sorted(self.folder.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                self._by_stem.setdefault(path.stem, path)
                if "_" in path.stem:
                    self._by_stem.setdefault("_" + path.stem.rsplit("_", 1)[1], path)

    def find(self, image_id: int | str, *, source: str) -> Path:
        """The file of `image_id`; DataError naming the id, the folder and `source` (who asked) when missing."""
        key = str(image_id)
        path = self._by_stem.get(key)
        if path is None and key.isdigit():
            path = self._by_stem.get(f"_{int(key):012d}")
        if path is None:
            raise DataError(
                f"{source}: no image for image_id {image_id!r} in {str(self.folder)!r} (expected a file named"
                f" {key}.<ext> or *_{int(key):012d}.<ext>)"
                if key.isdigit()
                else f"{source}: no image for image_id {image_id!r} in {str(self.folder)!r}"
            )
        return path


def read_json(path: str | Path, *, key: str) -> list:
    """The list under `key` of a JSON file, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{str(path)!r} has no {key!r} list")
    return data[key]


def _field(item: object, name: str, *, source: str, index: int):
    if not isinstance(item, dict) or name not in item:
        raise DataError(f"{source}: entry {index} has no {name!r}")
    return item[name]


def load_vqa(questions: str | Path, annotations: str | Path | None, images: str | Path) -> list[VqaExample]:
    """VQAv2 questions + annotations (None for an unannotated test split) + images, in the questions' order."""
    folder = ImageFolder(images)
    by_id: dict = {}
    for i, item in enumerate(read_json(questions, key="questions")):
        qid = _field(item, "question_id", source=str(questions), index=i)
        if qid in by_id:
            raise DataError(f"{str(questions)!r}: question_id {qid!r} appears twice (entries {by_id[qid][0]} and {i})")
        by_id[qid] = (i, item)
    answers: dict = {}
    if annotations is not None:
        for i, item in enumerate(read_json(annotations, key="annotations")):
            qid = _field(item, "question_id", source=str(annotations), index=i)
            if qid not in by_id:
                raise DataError(f"{str(annotations)!r}: the annotation of question_id {qid!r} has no question")
            if qid in answers:
                raise DataError(f"{str(annotations)!r}: question_id {qid!r} is annotated twice")
            given = _field(item, "answers", source=str(annotations), index=i)
            if not isinstance(given, list) or not given:
                raise DataError(f"{str(annotations)!r}: question_id {qid!r} has no answers")
            answers[qid] = tuple(str(_field(a, "answer", source=str(annotations), index=i)) for a in given)
        missing = [qid for qid in by_id if qid not in answers]
        if missing:
            raise DataError(
                f"{str(annotations)!r}: no annotation for question_id {missing[0]!r} ({len(missing)} in all)"
            )
    examples = []
    for qid, (i, item) in by_id.items():
        image_id = _field(item, "image_id", source=str(questions), index=i)
        question = _field(item, "question", source=str(questions), index=i)
        source = f"{questions} (question_id {qid!r})"
        image = folder.find(image_id, source=source)
        examples.append(VqaExample(qid, image_id, str(question), answers.get(qid, ()), image))
    return examples


def load_captions(annotations: str | Path, images: str | Path, *, split: str | None = None) -> list[CaptionExample]:
    """COCO captions (`images` + `annotations` with `image_id`, `caption`) or Karpathy's split JSON (`images` with
    `sentences`, `split`, `cocoid`/`imgid`, `filename`); `split` keeps only that Karpathy split ("train" also takes
    "restval")."""
    path = Path(annotations)
    entries = read_json(path, key="images")
    folder = ImageFolder(images)
    if entries and isinstance(entries[0], dict) and "sentences" in entries[0]:
        return _karpathy(path, entries, folder, split=split)
    captions: dict = {}
    for i, item in enumerate(read_json(path, key="annotations")):
        image_id = _field(item, "image_id", source=str(path), index=i)
        captions.setdefault(image_id, []).append(str(_field(item, "caption", source=str(path), index=i)))
    examples, seen = [], set()
    for i, item in enumerate(entries):
        image_id = _field(item, "id", source=str(path), index=i)
        if image_id in seen:
            raise DataError(f"{str(path)!r}: image id {image_id!r} appears twice in 'images'")
        seen.add(image_id)
        if image_id not in captions:
            raise DataError(f"{str(path)!r}: image id {image_id!r} has no caption")
        source = f"{path} (image id {image_id!r})"
        file = folder.folder / str(item.get("file_name", ""))
        if not file.is_file():
            file = folder.find(image_id, source=source)
        examples.append(CaptionExample(image_id, tuple(captions[image_id]), file))
    orphans = [image_id for image_id in captions if image_id not in seen]
    if orphans:
        raise DataError(f"{str(path)!r}: captions of image id {orphans[0]!r} but no such image in 'images'")
    return examples


def _karpathy(path: Path, entries: list, folder: ImageFolder, *, split: str | None) -> list[CaptionExample]:
    wanted = {"train", "restval"} if split == "train" else {split}
    examples, seen = [], set()
    for i, item in enumerate(entries):
        if split is not None and item.get("split") not in wanted:
            continue
        image_id = item.get("cocoid", item.get("imgid"))
        if image_id is None:
            raise DataError(f"{str(path)!r}: entry {i} has neither 'cocoid' nor 'imgid'")
        if image_id in seen:
            raise DataError(f"{str(path)!r}: image id {image_id!r} appears twice")
        seen.add(image_id)
        sentences = _field(item, "sentences", source=str(path), index=i)
        if not sentences:
            raise DataError(f"{str(path)!r}: image id {image_id!r} has no caption")
        source = f"{path} (image id {image_id!r})"
        file = folder.folder / item.get("filepath", "") / item["filename"] if "filename" in item else None
        if file is None or not file.is_file():
            file = folder.find(Path(item["filename"]).stem if "filename" in item else image_id, source=source)
        examples.append(CaptionExample(image_id, tuple(str(s["raw"]) for s in sentences), file))
    if not examples:
        raise DataError(f"{str(path)!r}: no images in split {split!r}")
    return examples


def read_classes(path: str | Path) -> list[str]:
    """Class names, one a line (blank lines ignored); DataError for a duplicate."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"classes file {str(path)!r} does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"{str(path)!r}: class {duplicates[0]!r} is listed twice")
    if len(names) < 2:
        raise DataError(f"{str(path)!r}: at least two classes are needed, got {len(names)}")
    return names


def load_classification(path: str | Path, classes: Iterable[str]) -> list[ClassificationExample]:
    """A JSONL of `{"image": path relative to the file (or absolute), "label": class name}`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist")
    known = set(classes)
    examples, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not valid JSON: {err}") from None
        for name in ("image", "label"):
            if not isinstance(row, dict) or not isinstance(row.get(name), str):
                raise DataError(f"{path}:{n}: no {name!r} string")
        if row["label"] not in known:
            raise DataError(f"{path}:{n}: label {row['label']!r} is not one of the classes")
        if row["image"] in seen:
            raise DataError(f"{path}:{n}: image {row['image']!r} appears twice")
        seen.add(row["image"])
        image = path.parent / row["image"]
        if not image.is_file():
            raise DataError(f"{path}:{n}: image file {str(image)!r} does not exist")
        examples.append(ClassificationExample(row["image"], row["label"], image))
    if not examples:
        raise DataError(f"{str(path)!r} has no examples")
    return examples
