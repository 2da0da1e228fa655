"""Fixtures of the evaluation tests: the demo model and small rendered demo evaluation sets."""

from pathlib import Path

import pytest

import idefics
from idefics import IdeficsForVisionText2Text, IdeficsProcessor
from idefics.demo.eval_sets import write_eval_sets


@pytest.fixture(scope="session")
def demo_model():
    return IdeficsForVisionText2Text.from_pretrained(idefics.DEMO_MODEL), IdeficsProcessor.from_pretrained(
        idefics.DEMO_MODEL
    )


@pytest.fixture(scope="session")
def eval_sets(tmp_path_factory) -> Path:
    """build/eval-demo in small: vqa/ and caption/, splits val (12 images) and train (24 images)."""
    return write_eval_sets(tmp_path_factory.mktemp("eval-demo"), val=12, train=24, seed=0)


def vqa_paths(root: Path, *, train: bool = True) -> dict:
    paths = dict(
        questions=str(root / "vqa/val_questions.json"),
        annotations=str(root / "vqa/val_annotations.json"),
        images=str(root / "vqa/val"),
    )
    if train:
        paths |= dict(
            train_questions=str(root / "vqa/train_questions.json"),
            train_annotations=str(root / "vqa/train_annotations.json"),
            train_images=str(root / "vqa/train"),
        )
    return paths
