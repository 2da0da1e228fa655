"""IdeficsImageProcessor against transformers' PIL-backend IdeficsImageProcessorPil, plus its own contract."""

import io
import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

from idefics.processing import IdeficsImageProcessor, UrlPolicy

from .conftest import encode, pattern

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def ref_image_processor():
    return IdeficsImageProcessorPil()


def reference(ref_image_processor, images) -> torch.Tensor:
    return ref_image_processor(images, return_tensors="pt")


KINDS = [
    "pil_rgb",
    "pil_rgba",
    "pil_p_transparency",
    "pil_la",
    "pil_l",
    "pil_cmyk",
    "pil_i16",
    "pil_1",
    "jpeg_lazy",
    "png_lazy",
    "array_uint8",
    "array_float_integers",
    "array_gray_hw1",
    "array_rgba",
    "tensor_uint8",
    "tensor_float_integers",
    "tiny_1x1",
    "large_2000x1500",
]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_for_each_input_kind(kind, sample_images, ref_image_processor):
    image = sample_images[kind]
    ours = IdeficsImageProcessor().preprocess(image)
    expected = reference(ref_image_processor, [image])
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    assert ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() <= TOLERANCE


def test_batch_of_every_kind_on_threads_matches_reference(sample_images, ref_image_processor):
    images = [sample_images[kind] for kind in KINDS]
    images.append(images[0])  # the same object twice: decoded once, not from two threads at once
    ours = IdeficsImageProcessor(num_workers=4).preprocess(images)
    expected = reference(ref_image_processor, images)
    assert ours.shape == (len(images), 3, 224, 224)
    assert (ours - expected).abs().max().item() <= TOLERANCE
    single_threaded = IdeficsImageProcessor(num_workers=1).preprocess(images)
    assert torch.equal(ours, single_threaded)


def test_image_size_matches_reference_built_with_that_size(sample_images):
    image = sample_images["pil_rgb"]
    expected = IdeficsImageProcessorPil(image_size=64)([image], return_tensors="pt")
    assert (IdeficsImageProcessor(image_size=64).preprocess(image) - expected).abs().max() <= TOLERANCE
    per_call = IdeficsImageProcessor().preprocess(image, image_size=64)
    assert (per_call - expected).abs().max() <= TOLERANCE


def test_reference_ignores_image_size_per_call_and_we_do_not(sample_images, ref_image_processor):
    """Reference bug: `image_size` passed to the call is accepted and silently ignored."""
    image = sample_images["pil_rgb"]
    assert ref_image_processor([image], image_size=64, return_tensors="pt").shape[-1] == 224
    assert IdeficsImageProcessor().preprocess(image, image_size=64).shape[-1] == 64


def test_float_images_in_unit_range_equal_their_8_bit_version(ref_image_processor):
    """Reference bug: floats in [0, 1] are scaled to 8 bits for resizing and then scaled by 1/255 once more,
    giving an almost constant image. Ours reads them as the same picture as the uint8 data."""
    data = pattern(64, 48, 30)
    processor = IdeficsImageProcessor()
    expected = processor.preprocess(data)
    for image in (data.astype(np.float32) / 255, torch.from_numpy(data).permute(2, 0, 1).float() / 255):
        assert torch.equal(processor.preprocess(image), expected)
        broken = reference(ref_image_processor, [image])
        spread = broken.amax(dim=(0, 2, 3)) - broken.amin(dim=(0, 2, 3))  # per channel
        assert spread.max() < 0.05 and (broken - expected).abs().max() > 1.0


def test_grey_2d_inputs_are_accepted():
    gray = pattern(40, 30, 31)[..., 0]
    processor = IdeficsImageProcessor()
    expected = processor.preprocess(np.repeat(gray[..., None], 3, axis=2))
    assert torch.equal(processor.preprocess(gray), expected)
    assert torch.equal(processor.preprocess(torch.from_numpy(gray)), expected)
    assert torch.equal(processor.preprocess(Image.fromarray(gray)), expected)


def test_transform_replaces_the_default_steps(sample_images):
    seen = []

    def transform(image):
        seen.append(image)
        return torch.full((3, 8, 8), float(len(seen)))

    images = [sample_images["pil_rgba"], sample_images["array_uint8"]]
    out = IdeficsImageProcessor().preprocess(images, transform=transform)
    assert out.shape == (2, 3, 8, 8)
    assert out[0].eq(1).all() and out[1].eq(2).all()
    assert seen[0] is images[0] and seen[1] is images[1]  # the images as given, not converted


def test_transform_errors_name_the_image(sample_images):
    image, array = sample_images["pil_rgb"], sample_images["array_uint8"]
    with pytest.raises(TypeError, match="image 1: the transform returned ndarray"):
        IdeficsImageProcessor().preprocess([image, array], transform=lambda x: torch.zeros(3) if x is image else x)
    shapes = iter([(3, 4, 4), (3, 5, 5)])
    with pytest.raises(ValueError, match=r"image 1: the transform returned shape \(3, 5, 5\)"):
        IdeficsImageProcessor().preprocess([image, image], transform=lambda x: torch.zeros(next(shapes)))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((3, 32, 32), np.uint8), r"expected an \(h, w, c\) array .* got \(3, 32, 32\)"),
        (np.zeros((8, 8, 2), np.uint8), r"got \(8, 8, 2\)"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"got \(2, 8, 8, 3\)"),
        (torch.zeros(32, 32, 3), r"expected a \(c, h, w\) tensor .* got \(32, 32, 3\)"),
        (np.zeros((0, 8, 3), np.uint8), "the image is empty"),
        (np.full((8, 8, 3), 300, np.int32), r"integer pixel values must lie in \[0, 255\], got \[300, 300\]"),
        (np.full((8, 8, 3), 1.5, np.float32), r"float pixel values must lie in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.zeros((8, 8, 3), bool), "unsupported dtype bool"),
        (b"\x89PNG", "expected a PIL image, a numpy array, a torch tensor or an http\\(s\\) URL"),
        ("/etc/passwd", "only http and https URLs"),
    ],
)
def test_bad_images_raise_errors_naming_the_image(image, message):
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises((TypeError, ValueError), match=f"^image 1: .*{message}"):
        IdeficsImageProcessor().preprocess([good, image])


def test_corrupt_lazy_image_names_the_image():
    data = encode(Image.fromarray(pattern(64, 64, 32)), "PNG")
    lazy = Image.open(io.BytesIO(data[:400]))  # the header parses, the pixels are cut
    with pytest.raises(ValueError, match=r"image 0: could not decode PIL image \(mode RGB, 64x64\)"):
        IdeficsImageProcessor().preprocess([lazy])


def test_urls_are_fetched_and_can_be_turned_off(image_server, ref_image_processor):
    base, _ = image_server
    urls = [f"{base}/photo.jpg", f"{base}/graph.png", f"{base}/rotated.jpg"]
    ours = IdeficsImageProcessor().preprocess(urls)
    assert (ours - reference(ref_image_processor, urls)).abs().max() <= TOLERANCE
    with pytest.raises(ValueError, match="image 0: .*URL fetching is disabled"):
        IdeficsImageProcessor(url_policy=UrlPolicy(enabled=False)).preprocess(urls)


def test_save_and_load_round_trip(tmp_path):
    processor = IdeficsImageProcessor(image_size=112, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.5, 1.0))
    processor.save_pretrained(tmp_path)
    loaded = IdeficsImageProcessor.from_pretrained(tmp_path)
    assert loaded == processor
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_size"] == 112 and config["image_processor_type"] == "IdeficsImageProcessor"


def test_saved_config_loads_in_the_reference(tmp_path, sample_images):
    ours = IdeficsImageProcessor(image_size=96, image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.4))
    ours.save_pretrained(tmp_path)
    reference = IdeficsImageProcessorPil.from_pretrained(tmp_path)
    image = sample_images["pil_rgba"]
    assert (ours.preprocess(image) - reference([image], return_tensors="pt")).abs().max() <= TOLERANCE


def test_loads_both_layouts(v5_dir, hub2023_dir):
    assert IdeficsImageProcessor.from_pretrained(v5_dir) == IdeficsImageProcessor()
    assert IdeficsImageProcessor.from_pretrained(hub2023_dir) == IdeficsImageProcessor()
    assert IdeficsImageProcessor.from_pretrained(v5_dir, image_size=28).image_size == 28  # kwargs override the file


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"size": {"height": 224, "width": 256}}, "square"),
        ({"do_normalize": False}, "do_normalize=false"),
        ({"image_num_channels": 1}, "image_num_channels must be 3"),
    ],
)
def test_unsupported_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        IdeficsImageProcessor.from_dict(config)


def test_missing_folder_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="'no-such-org/no-such-model' is not a local folder"):
        IdeficsImageProcessor.from_pretrained("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="has neither preprocessor_config.json"):
        IdeficsImageProcessor.from_pretrained(tmp_path)
