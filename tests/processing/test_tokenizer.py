"""IdeficsTokenizer against transformers' LlamaTokenizer loaded from the same files."""

import json
import random
import re

import pytest
import sentencepiece
import torch
from transformers import AutoTokenizer

from idefics.processing import IdeficsTokenizer

from .conftest import EXTRA_TOKENS

PIECES = [
    "hello",
    "world",
    "the cat sat on the mat",
    "User:",
    "Assistant:",
    "Describe this image.",
    "über",
    "naïve café",
    "日本語のテキスト",
    "привет мир",
    "مرحبا",
    "😀",
    "🐱‍👤",
    "👍🏽",
    "🇫🇷",
    "e\u0301",
    "\u200b",
    "x",
    "12345",
    "3.14159",
    "2023-08-22",
    "007",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<fake_token_around_image>",
    "<end_of_utterance>",
    "<image",
    "image>",
    "▁",
    "\\n",
    "\t",
    "{}[]()",
    "http://example.com/a.jpg",
]
SEPARATORS = ["", " ", "  ", "   ", "\n", "\n\n", " \n ", "\t", "\r\n", "  \n"]


def make_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    strings = ["", " ", "  ", "\n", "\n\n\n", " leading", "trailing ", "  both  ", "a  b   c", *PIECES]
    while len(strings) < count:
        n = rng.randint(1, 8)
        text = "".join(rng.choice(PIECES) + rng.choice(SEPARATORS) for _ in range(n))
        if rng.random() < 0.2:
            text = rng.choice(SEPARATORS) + text
        if rng.random() < 0.1:
            text = "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(1, 12)))
        strings.append(text)
    return strings


STRINGS = make_strings(1200)


@pytest.fixture(scope="module", params=["v5", "hub2023"])
def pair(request, v5_dir, hub2023_dir):
    """(ours, reference) loaded from the same folder, for each layout."""
    folder = v5_dir if request.param == "v5" else hub2023_dir
    return IdeficsTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_match_reference_on_1200_strings(pair, add_special_tokens):
    ours, reference = pair
    expected = reference(STRINGS, add_special_tokens=add_special_tokens)["input_ids"]
    got = ours.encode_batch(STRINGS, add_special_tokens=add_special_tokens)
    mismatches = [(s, g, e) for s, g, e in zip(STRINGS, got, expected, strict=True) if g != e]
    assert not mismatches, f"{len(mismatches)} differ, first: {mismatches[0]}"
    assert ours.encode(STRINGS[40], add_special_tokens=add_special_tokens) == expected[40]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_reference(pair, skip_special_tokens):
    ours, reference = pair
    sequences = reference(STRINGS, add_special_tokens=True)["input_ids"]
    expected = reference.batch_decode(sequences, skip_special_tokens=skip_special_tokens)
    assert ours.batch_decode(sequences, skip_special_tokens=skip_special_tokens) == expected
    for sequence in sequences[:200]:
        assert ours.decode(sequence, skip_special_tokens=skip_special_tokens) == reference.decode(
            sequence, skip_special_tokens=skip_special_tokens
        )
    tensor = torch.tensor(sequences[7])
    assert ours.decode(tensor, skip_special_tokens=skip_special_tokens) == expected[7]


def test_vocabulary_and_special_tokens_match_reference(pair):
    ours, reference = pair
    assert len(ours) == len(reference)
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.padding_side == reference.padding_side == "left"
    assert sorted(ours.all_special_ids) == sorted(reference.all_special_ids)
    tokens = ["<image>", "<fake_token_around_image>", "<end_of_utterance>", "▁the", "<0x0A>", "no-such-token"]
    assert ours.convert_tokens_to_ids(tokens) == reference.convert_tokens_to_ids(tokens)
    ids = reference("Hello wörld 😀\n<image>", add_special_tokens=True)["input_ids"]
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == reference.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    assert ours.convert_ids_to_tokens(ids[0]) == reference.convert_ids_to_tokens(ids[0])


def test_extra_tokens_are_read_in_both_spellings(v5_dir, hub2023_dir):
    assert "extra_special_tokens" in json.loads((v5_dir / "tokenizer_config.json").read_text())
    assert "additional_special_tokens" in json.loads((hub2023_dir / "special_tokens_map.json").read_text())
    for folder in (v5_dir, hub2023_dir):
        tokenizer = IdeficsTokenizer.from_pretrained(folder)
        assert tokenizer.extra_special_tokens == EXTRA_TOKENS
        assert set(EXTRA_TOKENS) <= set(tokenizer.all_special_tokens)


def test_added_tokens_match_reference(v5_dir):
    ours, reference = IdeficsTokenizer.from_pretrained(v5_dir), AutoTokenizer.from_pretrained(v5_dir)
    assert ours.add_tokens(["<new_word>", "zorglub"]) == reference.add_tokens(["<new_word>", "zorglub"]) == 2
    assert ours.add_tokens("<new_special>", special=True) == reference.add_tokens("<new_special>", special_tokens=True)
    assert ours.add_tokens("<new_word>") == 0
    texts = ["a <new_word> b", "zorglubs<new_special>x", " <new_word><new_special> zorglub\n"]
    assert ours.encode_batch(texts, add_special_tokens=False) == reference(texts, add_special_tokens=False)["input_ids"]
    assert len(ours) == len(reference)
    ids = ours.encode(texts[1], add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": "longest"},
        {"padding": "max_length", "max_length": 40},
        {"padding": "longest", "truncation": True, "max_length": 6},
        {"padding": False, "truncation": True, "max_length": 3},
    ],
)
def test_call_pads_and_truncates_as_reference(v5_dir, kwargs):
    ours, reference = IdeficsTokenizer.from_pretrained(v5_dir), AutoTokenizer.from_pretrained(v5_dir)
    texts = ["short", "a much longer text with 123 digits", "<image> in text"]
    expected = reference(texts, add_special_tokens=False, **kwargs)
    got = ours(texts, add_special_tokens=False, **kwargs)
    assert got.input_ids == expected["input_ids"] and got.attention_mask == expected["attention_mask"]
    single = ours("one text", add_special_tokens=False)
    assert single.input_ids == reference("one text", add_special_tokens=False)["input_ids"]


def test_right_padding_and_tensors(v5_dir):
    tokenizer = IdeficsTokenizer.from_pretrained(v5_dir)
    tokenizer.padding_side = "right"
    out = tokenizer(["a", "a b c d"], add_special_tokens=False, padding=True, return_tensors="pt")
    assert out.input_ids.dtype == torch.long and out.input_ids.shape == out.attention_mask.shape
    assert out.attention_mask[0].tolist() == sorted(out.attention_mask[0].tolist(), reverse=True)
    assert out.input_ids[0, -1].item() == tokenizer.pad_token_id


def test_padding_errors_are_clear(v5_dir):
    tokenizer = IdeficsTokenizer.from_pretrained(v5_dir)
    with pytest.raises(ValueError, match="text 1 has .* tokens, more than max_length=2; pass truncation=True"):
        tokenizer(["a", "a b c d e"], padding="max_length", max_length=2)
    with pytest.raises(ValueError, match="different lengths"):
        tokenizer(["a", "a b c d e"], return_tensors="pt")
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        tokenizer(["a", "a b c d e"], padding=True)


def test_save_round_trip_and_reference_loads_it(v5_dir, tmp_path):
    ours = IdeficsTokenizer.from_pretrained(v5_dir)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    again, reference = IdeficsTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    expected = reference(STRINGS[:300], add_special_tokens=False)["input_ids"]
    assert again.encode_batch(STRINGS[:300], add_special_tokens=False) == expected
    assert again.extra_special_tokens == EXTRA_TOKENS and again.pad_token_id == ours.pad_token_id


def test_a_2023_style_tokenizer_json_is_used_as_written(v5_dir, sentencepiece_dir, tmp_path):
    """The 2023 hub files predate Metaspace's `prepend_scheme`: their tokenizer.json prepends "▁" with a normalizer,
    so text after a special token starts a new word, as SentencePiece (and transformers 4, used in training) encodes
    each segment. We read the file as written; transformers 5 rebuilds LLaMA's pipeline and differs there."""

    config = json.loads((v5_dir / "tokenizer.json").read_text())
    config["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    config["pre_tokenizer"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer_config.json").write_text((v5_dir / "tokenizer_config.json").read_text())
    ours, reference = IdeficsTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    specials = re.compile("(" + "|".join(re.escape(t) for t in ["<s>", "</s>", *EXTRA_TOKENS]) + ")")

    def by_segment(text: str) -> list[int]:
        pieces = [p for p in specials.split(text) if p]
        return [
            i for p in pieces for i in ([ours.convert_tokens_to_ids(p)] if specials.fullmatch(p) else spm.encode(p))
        ]

    texts = [
        "<s>User:<fake_token_around_image><image><fake_token_around_image>Describe this image.",
        "<end_of_utterance>\nAssistant: two kittens",
        "hello world",
        "the cat<image>sat on 12 mats",
    ]
    assert [ours.encode(t, add_special_tokens=False) for t in texts] == [by_segment(t) for t in texts]
    assert reference(texts[0], add_special_tokens=False)["input_ids"] != by_segment(texts[0])
