"""IdeficsProcessor against transformers' IdeficsProcessor (fixture tokenizer, PIL-backend image processor)."""

import io
import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from hub_cache import fake_hub_snapshot
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import BPE

from idefics.processing import (
    IdeficsImageProcessor,
    IdeficsProcessor,
    IdeficsTokenizer,
    UrlPolicy,
    image_attention_mask,
)

from .conftest import encode, pattern, reference_processor

EOU = "<end_of_utterance>"

# Each case: images (sample_images), base URL of the test server -> (prompts, keyword arguments for both processors).
CASES = {
    "single": lambda im, url: (["User:", im["pil_rgb"], "Describe this image.\nAssistant:"], {}),
    "batch_uneven_images": lambda im, url: (
        [["A photo:", im["pil_rgb"], "of a cat"], ["Two:", im["pil_l"], "and", im["array_uint8"], "done"]],
        {},
    ),
    "consecutive_images": lambda im, url: (
        [["Three in a row", im["pil_rgb"], im["pil_rgba"], im["tensor_uint8"], "then text", im["pil_cmyk"]]],
        {},
    ),
    "text_only_single": lambda im, url: (["Just some text, no images at all."], {}),
    "text_only_batch": lambda im, url: ([["short"], ["a somewhat longer prompt with 42 digits"]], {}),
    "image_only": lambda im, url: ([im["jpeg_lazy"]], {}),
    "images_first_and_last": lambda im, url: ([im["png_lazy"], "middle", im["pil_la"]], {}),
    "urls": lambda im, url: (
        [["User:", f"{url}/photo.jpg", "and", f"  {url}/graph.png ", "Assistant:"], [im["pil_rgb"], f"{url}/binary"]],
        {},
    ),
    "url_with_exif_rotation": lambda im, url: (["Rotated:", f"{url}/rotated.jpg"], {}),
    "not_a_url_with_a_space": lambda im, url: (["see http://example.com/a b.jpg", im["pil_rgb"]], {}),
    "all_pil_modes": lambda im, url: (
        [im[k] for k in ("pil_rgb", "pil_rgba", "pil_p_transparency", "pil_la", "pil_l", "pil_cmyk", "pil_i16")]
        + ["modes", im["pil_1"]],
        {},
    ),
    "arrays_and_tensors": lambda im, url: (
        [["x", im["array_uint8"], "y", im["array_gray_hw1"]], ["z", im["array_rgba"], im["tensor_float_integers"]]],
        {},
    ),
    "padding_max_length": lambda im, url: ([["a", im["pil_rgb"]], ["b c d e", im["pil_l"], "f"]], _max(60)),
    "truncation_drops_images": lambda im, url: (
        [["Start", im["pil_rgb"], "one two three four five six", im["pil_l"], "end"]],
        {"truncation": True, "max_length": 12},
    ),
    "truncation_batch_with_max_length_padding": lambda im, url: (
        [["long long long text", im["pil_rgb"], "more", im["pil_la"]], ["tiny", im["array_uint8"]]],
        {"truncation": True, "max_length": 9, "padding": "max_length"},
    ),
    "eos_inside_text_stops_attention": lambda im, url: (
        [["Doc one", im["pil_rgb"], "caption</s>Doc two starts", im["pil_l"], "caption two</s>tail"]],
        {},
    ),
    "add_eos_token": lambda im, url: ([["Hi", im["pil_rgb"], "bye"], ["text only"]], {"add_eos_token": True}),
    "end_of_utterance_on": lambda im, url: (
        ["User: hi", "there", im["pil_rgb"], "Assistant: hello", "User: again"],
        {"add_end_of_utterance_token": True},
    ),
    "end_of_utterance_off": lambda im, url: (
        ["User: hi", "there", im["pil_rgb"], "Assistant: hello", "User: again"],
        {"add_end_of_utterance_token": False},
    ),
    "spaces_and_newlines_around_items": lambda im, url: (
        ["  leading and trailing  ", im["pil_rgb"], "\n newline item \n", " ", "", "last "],
        {"add_end_of_utterance_token": False},
    ),
    "model_card_instruct": lambda im, url: (
        [
            [
                "User: What is in this image?",
                f"{url}/photo.jpg",
                EOU,
                "\nAssistant: This picture depicts Idefix, the dog of Obelix. Idefix is running on the ground." + EOU,
                "\nUser:",
                f"{url}/graph.png",
                "And who is that?" + EOU,
                "\nAssistant:",
            ]
        ],
        {"add_end_of_utterance_token": False},
    ),
    "batch_of_four": lambda im, url: (
        [
            ["none here"],
            [im["pil_rgb"], "one"],
            ["two", im["pil_l"], im["tiny_1x1"]],
            ["three", im["large_2000x1500"], "a", im["pil_cmyk"], "b", im["png_lazy"]],
        ],
        {},
    ),
    "unicode_text": lambda im, url: (["日本語 😀 über\n\n  spaces", im["pil_rgb"], "12345 digits"], {}),
}


def _max(n: int) -> dict:
    return {"padding": "max_length", "max_length": n}


def assert_same(ours, expected) -> None:
    assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "image_attention_mask"}
    assert ours.input_ids.dtype == ours.attention_mask.dtype == ours.image_attention_mask.dtype == torch.int64
    assert torch.equal(ours.input_ids, expected["input_ids"])
    assert torch.equal(ours.attention_mask, expected["attention_mask"])
    assert torch.equal(ours.image_attention_mask, expected["image_attention_mask"].long())
    assert ours.pixel_values.shape == expected["pixel_values"].shape
    assert (ours.pixel_values - expected["pixel_values"]).abs().max().item() <= 1e-5


@pytest.fixture(scope="module", params=["v5", "hub2023"])
def pair(request, v5_dir, hub2023_dir):
    folder = v5_dir if request.param == "v5" else hub2023_dir
    return IdeficsProcessor.from_pretrained(folder), reference_processor(folder)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, pair, sample_images, image_server):
    ours, reference = pair
    prompts, kwargs = CASES[case](sample_images, image_server[0])
    assert_same(ours(prompts, **kwargs), reference(text=prompts, **kwargs))


def test_text_keyword_is_the_same_as_positional(processor, sample_images):
    prompts = ["a", sample_images["pil_rgb"], "b"]
    first, second = processor(prompts), processor(text=prompts)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_default_end_of_utterance_follows_the_tokenizer_unlike_reference(processor, ref_processor, sample_images):
    """Documented default: add `<end_of_utterance>` between text items iff the tokenizer has it as a special token.
    transformers 5 looks for it under a key its tokenizers no longer have, so it never adds it."""
    prompts = ["User: hi", "Assistant: hello", sample_images["pil_rgb"]]
    assert processor.add_end_of_utterance_token
    ours, expected = processor(prompts), processor(prompts, add_end_of_utterance_token=True)
    assert torch.equal(ours.input_ids, expected.input_ids)
    eou_id = processor.tokenizer.convert_tokens_to_ids(EOU)
    assert (ours.input_ids == eou_id).sum() == 1
    assert (ref_processor(text=prompts)["input_ids"] == eou_id).sum() == 0


def test_text_only_batch_gives_zeros(processor):
    out = processor([["hello"], ["a longer text"]])
    b, t = out.input_ids.shape
    assert out.image_attention_mask.shape == (b, t, 1) and not out.image_attention_mask.any()
    assert out.pixel_values.shape == (b, 1, 3, 224, 224) and not out.pixel_values.any()


def test_image_attention_mask_rules():
    ids = torch.tensor([[1, 5, 9, 7, 9, 5, 2, 5, 9, 7, 9, 5, 2, 5]])  # image 7, eos 2, fake 9
    mask = image_attention_mask(ids, image_token_id=7, eos_token_id=2, num_images=2)
    attended = [row.argmax().item() if row.any() else None for row in mask[0]]
    assert attended == [None, None, None, 0, 0, 0, 0, None, None, 1, 1, 1, 1, None]


def test_left_padding_and_pixel_slots(processor, sample_images):
    image = sample_images["pil_rgb"]
    out = processor([["one", image, "two three four five"], ["x", image, image]])
    assert out.attention_mask[1, 0] == 0 and out.input_ids[1, 0] == processor.tokenizer.pad_token_id
    alone = processor.image_processor.preprocess(image)[0]
    assert torch.equal(out.pixel_values[0, 0], alone) and not out.pixel_values[0, 1].any()
    assert torch.equal(out.pixel_values[1, 1], alone)


def test_right_padding_matches_reference(v5_dir, sample_images):
    ours, reference = IdeficsProcessor.from_pretrained(v5_dir), reference_processor(v5_dir)
    ours.tokenizer.padding_side = reference.tokenizer.padding_side = "right"
    prompts = [["a b c d e f", sample_images["pil_rgb"]], ["g", sample_images["pil_l"], "h"]]
    out = ours(prompts)
    assert out.attention_mask[1, -1] == 0
    assert_same(out, reference(text=prompts))


def test_left_truncation_keeps_the_images_whose_tokens_remain(v5_dir, sample_images):
    """Reference bug: with truncation_side="left" it keeps the first images although their tokens were cut."""
    ours, reference = IdeficsProcessor.from_pretrained(v5_dir), reference_processor(v5_dir)
    ours.tokenizer.truncation_side = reference.tokenizer.truncation_side = "left"
    first, second = sample_images["pil_rgb"], sample_images["pil_l"]
    prompts = [["Start", first, "one two three four five six seven", second, "end"]]
    out = ours(prompts, truncation=True, max_length=8)
    expected = reference(text=prompts, truncation=True, max_length=8)
    assert torch.equal(out.input_ids, expected["input_ids"])
    assert (out.input_ids == ours.image_token_id).sum() == 1
    second_alone = ours.image_processor.preprocess(second)[0]
    assert torch.equal(out.pixel_values[0, 0], second_alone)
    first_alone = ours.image_processor.preprocess(first)[0]
    assert (expected["pixel_values"][0, 0] - first_alone).abs().max() <= 1e-5


def test_transform_is_applied_to_every_image(processor, sample_images):
    prompts = [["a", sample_images["pil_rgb"], "b", sample_images["array_uint8"]], ["c"]]
    out = processor(prompts, transform=lambda image: torch.ones(3, 32, 32))
    assert out.pixel_values.shape == (2, 2, 3, 32, 32)
    assert out.pixel_values[0].eq(1).all() and not out.pixel_values[1].any()


def test_image_size_per_call(processor, sample_images):
    out = processor(["a", sample_images["pil_rgb"]], image_size=64)
    assert out.pixel_values.shape == (1, 1, 3, 64, 64)


def test_outputs_move_and_cast(processor, sample_images):
    out = processor(["a", sample_images["pil_rgb"]]).to(torch.float16)
    assert out.pixel_values.dtype == torch.float16 and out.input_ids.dtype == torch.int64
    assert out.to("cpu").input_ids.device.type == "cpu"


def test_decode(processor, sample_images):
    out = processor([["User:", sample_images["pil_rgb"], "hello world"]])
    assert processor.decode(out.input_ids[0], skip_special_tokens=True) == "User:hello world"
    text = processor.batch_decode(out.input_ids)[0]
    assert text.startswith("<s>") and "<fake_token_around_image><image><fake_token_around_image>" in text


def test_both_layouts_load_the_same_processor(v5_dir, hub2023_dir, sample_images):
    prompts = [["x", sample_images["pil_rgb"], "y z"], ["w"]]
    a, b = IdeficsProcessor.from_pretrained(v5_dir)(prompts), IdeficsProcessor.from_pretrained(hub2023_dir)(prompts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_pretrained_writes_the_2023_layout_and_reference_reads_it(processor, tmp_path, sample_images):
    processor.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert EOU in json.loads((tmp_path / "special_tokens_map.json").read_text())["additional_special_tokens"]
    prompts = [["x", sample_images["pil_rgba"], "y"], ["w", sample_images["array_uint8"]]]
    assert_same(IdeficsProcessor.from_pretrained(tmp_path)(prompts), reference_processor(tmp_path)(text=prompts))


def test_loads_from_the_hub_cache_offline(v5_dir, tmp_path, monkeypatch, sample_images):
    fake_hub_snapshot(tmp_path, "org/tiny-idefics", v5_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = IdeficsProcessor.from_pretrained("org/tiny-idefics")
    prompts = ["x", sample_images["pil_rgb"]]
    assert torch.equal(loaded(prompts).input_ids, IdeficsProcessor.from_pretrained(v5_dir)(prompts).input_ids)
    with pytest.raises(FileNotFoundError, match="'org/absent' is not a local folder"):
        IdeficsProcessor.from_pretrained("org/absent")


@pytest.mark.parametrize(
    ("prompts", "error", "message"),
    [
        ([], ValueError, "expected a prompt"),
        ([["ok"], []], ValueError, "prompt 1 is empty"),
        ([["ok"], "not a list"], TypeError, "prompt 1: in a batch every prompt must be a list"),
        ([["ok", 3]], TypeError, "prompt 0, item 1: unsupported object of type int"),
        ([["ok"], ["a", None]], TypeError, "prompt 1, item 1: unsupported object of type NoneType"),
        ([["see <image> here"]], ValueError, r"prompt 0, item 0: 'see <image> here' contains '<image>'"),
        ([["a", np.zeros((3, 8, 8), np.uint8)]], ValueError, r"prompt 0, item 1: ndarray of shape \(3, 8, 8\)"),
        ([["a", torch.zeros(8, 8, 3)]], ValueError, r"prompt 0, item 1: Tensor of shape \(8, 8, 3\)"),
        (
            [["a"], ["b", "ftp://host/x.png"]],
            ValueError,
            "prompt 1, item 1: only http and https URLs .* 'ftp://host/x.png'",
        ),
    ],
)
def test_bad_prompts_raise_before_any_work(processor, prompts, error, message, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no image may be fetched or decoded before every item is checked")

    monkeypatch.setattr(processor.image_processor, "pixel_values", fail)
    monkeypatch.setattr("idefics.processing.image.fetch_image", fail)
    with pytest.raises(error, match=message):
        processor(prompts + [["later", "http://127.0.0.1:9/never-fetched.png"]] if prompts else prompts)


def test_url_errors_name_the_prompt_item_and_url(v5_dir, image_server, monkeypatch):
    base, _ = image_server
    processor = IdeficsProcessor.from_pretrained(v5_dir, url_policy=UrlPolicy(enabled=False))
    with pytest.raises(ValueError, match=f"prompt 0, item 1: URL fetching is disabled, cannot load '{base}/photo.jpg'"):
        processor(["a", f"{base}/photo.jpg"])
    processor = IdeficsProcessor.from_pretrained(v5_dir)
    with pytest.raises(ValueError, match=f"prompt 1, item 0: '{base}/corrupt.jpg': not a readable image"):
        processor([["fine", f"{base}/photo.jpg"], [f"{base}/corrupt.jpg"]])


def test_processor_needs_the_image_tokens():
    tokenizer = IdeficsTokenizer(Tokenizer(BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, merges=[])))
    with pytest.raises(ValueError, match="the tokenizer has no '<image>' token"):
        IdeficsProcessor(IdeficsImageProcessor(), tokenizer)


def test_bad_arguments_raise_before_any_fetch(processor, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("nothing may be fetched")

    monkeypatch.setattr("idefics.processing.image.fetch_image", fail)
    prompt = ["a", "http://127.0.0.1:9/never-fetched.png"]
    with pytest.raises(ValueError, match="padding must be"):
        processor(prompt, padding="sideways")
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        processor(prompt, padding="max_length")
    with pytest.raises(ValueError, match="only return_tensors='pt'"):
        processor(prompt, return_tensors="np")
    with pytest.raises(ValueError, match="exactly once"):
        processor(prompt, text=prompt)


def test_a_lone_string_is_one_text_item_unlike_reference(processor, ref_processor):
    """Reference bug: a bare string prompt is iterated character by character, dropping its spaces."""
    ours = processor("hello world")
    assert torch.equal(ours.input_ids, processor(["hello world"]).input_ids)
    assert processor.decode(ours.input_ids[0]) == "<s>hello world"
    assert ref_processor.tokenizer.decode(ref_processor(text="hello world")["input_ids"][0]) == "<s>helloworld"


def test_transparent_url_images_are_composited_like_in_memory_ones(processor, ref_processor, image_server):
    """Reference quirk: a downloaded RGBA image loses its alpha (transparent pixels keep their hidden colour), while
    the same image passed in memory is composited onto white. Ours treats both the same way."""
    base, state = image_server
    rgba = np.dstack([pattern(64, 64, 40), np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))])
    state.routes["/alpha.png"] = (200, {"Content-Type": "image/png"}, encode(Image.fromarray(rgba), "PNG"))
    in_memory = Image.open(io.BytesIO(state.routes["/alpha.png"][2]))
    by_url = processor(["x", f"{base}/alpha.png"]).pixel_values
    assert torch.equal(by_url, processor(["x", in_memory]).pixel_values)
    reference_by_url = ref_processor(text=["x", f"{base}/alpha.png"])["pixel_values"]
    assert (reference_by_url - by_url).abs().max() > 1.0
