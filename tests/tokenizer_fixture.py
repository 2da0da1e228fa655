"""A small LLaMA-style SentencePiece tokenizer trained in the test session (byte fallback, split digits), saved as
transformers 5 saves processor files. Shared by the processing and generation tests."""

import random
from pathlib import Path

import pytest
import sentencepiece
from transformers import IdeficsProcessor as RefProcessor
from transformers import LlamaTokenizer
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

EXTRA_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
SYLLABLES = (
    "ka to ri mu sen pla tion ing er qu ell ax zo bri ght an de ver os ü é ñ ß 日 本 語 テ キ при вет ми 数 据 ال عر"
).split()
WORDS = (
    "the a cat dog sat on mat image picture describe this what is in of and to two kittens grass User Assistant "
    "Idefix Obelix running ground who that answer question photo caption color red blue"
).split()


def _corpus(rng: random.Random) -> list[str]:
    words = WORDS + ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(500)]
    lines = []
    for _ in range(4000):
        tokens = [
            rng.choice(words) if rng.random() < 0.85 else str(rng.randint(0, 99999)) for _ in range(rng.randint(3, 15))
        ]
        line = " ".join(tokens).capitalize() + rng.choice([".", "?", "!", ":", ",", ""])
        lines.append(rng.choice(["", "User: ", "Assistant: ", "- "]) + line)
    return lines


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A LLaMA-style SentencePiece BPE model (byte fallback, split digits, dummy prefix), 1,000 pieces."""
    folder = tmp_path_factory.mktemp("sentencepiece")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_corpus(random.Random(0))), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    return folder


@pytest.fixture(scope="session")
def v5_dir(sentencepiece_dir, tmp_path_factory) -> Path:
    """Processor files as transformers 5 saves them: processor_config.json (image processor nested),
    tokenizer.json (converted by transformers), tokenizer_config.json with `extra_special_tokens`."""

    tokenizer = LlamaTokenizer.from_pretrained(sentencepiece_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": EXTRA_TOKENS})
    tokenizer.pad_token = tokenizer.unk_token
    folder = tmp_path_factory.mktemp("v5")
    RefProcessor(image_processor=IdeficsImageProcessorPil(), tokenizer=tokenizer).save_pretrained(folder)
    assert (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").exists()
    return folder
