import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

from finetune_fixture import finetune_env  # noqa: E402, F401  (session fixture)
from reference import CONFIGS, reference_model, save_reference  # noqa: E402
from structured_fixture import random_text_model  # noqa: E402, F401  (session fixture)
from tokenizer_fixture import sentencepiece_dir, v5_dir  # noqa: E402, F401  (session fixtures)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory):
    """name -> (perturbed transformers model, folder with its sharded save). Built lazily, once per session."""
    built = {}

    def get(name: str):
        if name not in built:
            model = reference_model(name)
            folder = save_reference(model, tmp_path_factory.mktemp(name), name=name)
            built[name] = (model, folder)
        return built[name]

    return get


ALL_CONFIGS = list(CONFIGS)
