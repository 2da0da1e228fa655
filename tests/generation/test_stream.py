"""Streaming text deltas and stop strings, with a byte-fallback LLaMA-style tokenizer trained in the session."""

import pytest
import torch
from reference import config_dict, perturb, save_reference

import idefics
from idefics.generation import stream_generate
from idefics.generation.stream import TextDeltas
from idefics.processing import IdeficsTokenizer

TEXTS = [
    "Hello world, the cat sat on the mat.",
    "Emoji 🎉🐈 and 日本語 テキスト mixed in: привет!",
    "Numbers 1234567 and   several   spaces\nnew lines\n\n done",
    "User: what is in this picture?<end_of_utterance>\nAssistant: two kittens",
]


@pytest.fixture(scope="module")
def tokenizer(v5_dir):
    return IdeficsTokenizer.from_pretrained(v5_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_decoded_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in tokenizer.encode("🎉🐈"))
    deltas = TextDeltas(tokenizer)
    pieces = [deltas.push(i) for i in ids] + [deltas.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello there\nUser: next question", ["\nUser:"], "Hello there"),
        ("abc 🎉 then STOP and more", ["STOP", "never"], "abc 🎉 then "),
        ("no stop string here at all", ["xyz"], "no stop string here at all"),
        ("partial Us at the end", ["User:"], "partial Us at the end"),
    ],
)
def test_stop_strings_are_cut_and_held_back(tokenizer, text, stop, expected):
    deltas = TextDeltas(tokenizer, stop_strings=stop)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = []
    for i in ids:
        pieces.append(deltas.push(i))
        shown = "".join(pieces)
        assert not any(s[:2] in shown[len(expected) :] for s in stop if len(shown) > len(expected))
    pieces.append(deltas.finish())
    assert "".join(pieces) == expected


@pytest.fixture(scope="module")
def text_model(tokenizer, tmp_path_factory):
    """A perturbed reference model whose vocabulary is the fixture tokenizer's."""
    import transformers

    data = config_dict("plain_vector_zeros", vocab_size=len(tokenizer), additional_vocab_size=0)
    torch.manual_seed(0)
    ref = transformers.IdeficsForVisionText2Text(transformers.IdeficsConfig(**data))
    perturb(ref)
    folder = save_reference(ref.eval(), tmp_path_factory.mktemp("text_model"), name="plain_vector_zeros")
    return ref, idefics.IdeficsForVisionText2Text.from_pretrained(folder)


def test_stream_generate_yields_the_generated_text(tokenizer, text_model):
    _, model = text_model
    ids = torch.tensor([tokenizer.encode("User: describe the picture\nAssistant:")])
    kwargs = dict(max_new_tokens=24, do_sample=True, seed=3, temperature=1.3, eos_token_id=tokenizer.eos_token_id)
    full = model.generate(ids, **kwargs)
    text = "".join(stream_generate(model, tokenizer, ids, **kwargs))
    assert text == tokenizer.decode(full[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    assert len(text) > 0
    with pytest.raises(ValueError, match="batch 1"):
        next(stream_generate(model, tokenizer, ids.repeat(2, 1), max_new_tokens=2))


def test_stop_strings_match_reference(tokenizer, text_model, v5_dir):
    """Rows stop on the token that completes a stop string, as transformers' StopStringCriteria decides."""
    from transformers import AutoTokenizer

    ref, model = text_model
    ref_tokenizer = AutoTokenizer.from_pretrained(v5_dir)
    ids = torch.tensor([tokenizer.encode("User: describe the picture\nAssistant:")] * 2)
    images = dict(pixel_values=torch.randn(2, 1, 3, 28, 28), image_attention_mask=torch.zeros(2, ids.shape[1], 1))
    images["image_attention_mask"][1, 3:] = 1  # row 1 sees its image
    base = dict(max_new_tokens=20, eos_token_id=tokenizer.eos_token_id, pad_token_id=0, repetition_penalty=1.3)
    base |= images
    free = model.generate(ids, **base)
    new_text = tokenizer.decode(free[0, ids.shape[1] :].tolist())
    stop = new_text.strip()[3:6]  # a string the model does produce, ending somewhere inside the reply
    assert stop
    with torch.no_grad():
        expected = ref.generate(ids, stop_strings=[stop], tokenizer=ref_tokenizer, do_sample=False, **base)
    got = model.generate(ids, stop_strings=[stop], tokenizer=tokenizer, **base)
    assert torch.equal(got, expected)
    assert not torch.equal(got[0], free[0])  # row 0 stopped early and was padded
    base |= {k: v[:1] for k, v in images.items()}
    streamed = "".join(stream_generate(model, tokenizer, ids[:1], stop_strings=[stop], **base))
    reply = tokenizer.decode(free[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    assert streamed == reply[: reply.find(stop)]
