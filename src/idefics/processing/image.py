"""IDEFICS image preprocessing: any image to RGB, bicubic resize to r×r (aspect ratio ignored), ×1/255, normalise.

The output matches the PIL path of transformers' `IdeficsImageProcessorPil` to within 1e-5. It is faster because each
image is decoded, resized and normalised (one float32 multiply-add) on a thread pool: PIL and numpy release the GIL
there, so the work spreads over the CPU cores. Legend: n images, r image size.
"""

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fetch import UrlPolicy, check_url, fetch_image
from .hub import resolve_folder

IDEFICS_MEAN = (0.48145466, 0.4578275, 0.40821073)
IDEFICS_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"  # 2023 hub layout
PROCESSOR_CONFIG_NAME = "processor_config.json"  # transformers 5 layout, image processor nested under "image_processor"

ImageLike = Image.Image | np.ndarray | torch.Tensor
Transform = Callable[[ImageLike], torch.Tensor]


def describe(item: object) -> str:
    """A short description of a prompt item, for error messages."""
    if isinstance(item, str):
        return repr(item if len(item) <= 80 else item[:77] + "...")
    if isinstance(item, Image.Image):
        return f"PIL image (mode {item.mode}, {item.width}x{item.height})"
    if isinstance(item, np.ndarray | torch.Tensor):
        return f"{type(item).__name__} of shape {tuple(item.shape)} and dtype {item.dtype}"
    return f"object of type {type(item).__name__}"


def _array_to_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Arrays are (h, w, c), tensors (c, h, w); both may be (h, w) grey. Returns (h, w, c) with c in 1, 3, 4."""
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        elif tensor.ndim != 2:
            raise ValueError(
                f"expected a (c, h, w) tensor with c in 1, 3, 4 or an (h, w) one, got {tuple(image.shape)}"
            )
        array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    else:
        array = image
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
            raise ValueError(
                f"expected an (h, w, c) array with c in 1, 3, 4 or an (h, w) one, got {array.shape}"
                " (for channels-first data pass a torch tensor)"
            )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the image is empty, shape {tuple(image.shape)}")
    return array[:, :, None] if array.ndim == 2 else array


def _to_0_255(array: np.ndarray) -> np.ndarray:
    """uint8 as it is; integer-valued numbers in [0, 255] cast to uint8; other floats in [0, 1] scaled to [0, 255]."""
    if array.dtype == np.uint8:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"unsupported dtype {array.dtype}, expected integers or floats")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError("the image has NaN or infinite values")
    low, high = array.min().item(), array.max().item()
    # The reference's rule: values close to their integer part are read on the 0-255 scale, even all-0/1 floats.
    if np.issubdtype(array.dtype, np.integer) or np.allclose(array, array.astype(np.int64)):
        if low < 0 or high > 255:
            raise ValueError(f"integer pixel values must lie in [0, 255], got [{low}, {high}]")
        return array.astype(np.uint8)
    if low < 0 or high > 1:
        raise ValueError(f"float pixel values must lie in [0, 1] (or be integers in [0, 255]), got [{low}, {high}]")
    return array.astype(np.float64) * 255


def array_to_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Check an array or tensor image and convert it to uint8 RGB (h, w, 3).

    One channel is repeated, four channels are composited onto white (as the reference does for arrays), and
    floats in [0, 1] are scaled and rounded to 8 bits.
    """
    values = _to_0_255(_array_to_hwc(image))  # (h, w, c)
    if values.shape[2] == 4:
        alpha = values[..., 3:] / 255
        values = np.round(alpha * values[..., :3] + (1 - alpha) * 255)
    elif values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    if values.dtype != np.uint8:
        values = np.round(values).astype(np.uint8)
    return np.ascontiguousarray(values)  # (h, w, 3)


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency (an alpha band or a palette's transparent index) is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class IdeficsImageProcessor:
    """Turns images into the (n, 3, r, r) float tensor the IDEFICS vision encoder takes.

    Accepts PIL images of any mode, numpy arrays (h, w, c), torch tensors (c, h, w) and http(s) URLs.
    """

    image_size: int = 224  # r: images are resized to r×r
    image_mean: tuple[float, float, float] = IDEFICS_MEAN
    image_std: tuple[float, float, float] = IDEFICS_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    num_workers: int | None = None  # threads decoding and resizing; None: one per CPU core
    url_policy: UrlPolicy = field(default_factory=UrlPolicy)

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean} and {self.image_std}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        self.resample = Image.Resampling(self.resample)

    def __call__(self, images, **kwargs) -> torch.Tensor:
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images: ImageLike | str | Sequence[ImageLike | str],
        *,
        image_size: int | None = None,
        transform: Transform | None = None,
        return_tensors: str = "pt",
    ) -> torch.Tensor:
        """Preprocess one image or a list of them into a float32 tensor (n, 3, r, r).

        `transform`, a callable from one image to a (c, h, w) tensor (e.g. training augmentations), replaces the
        conversion, resize and normalisation; it receives the images as given (URLs already fetched).
        """
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        items = list(images) if isinstance(images, list | tuple) else [images]
        if not items:
            raise ValueError("no images given")
        labels = [f"image {i}" for i in range(len(items))]
        loaded = self.load(items, labels=labels, transform=transform)
        return self.pixel_values(loaded, labels=labels, image_size=image_size, transform=transform)

    def load(self, items: Sequence[object], *, labels: Sequence[str], transform: Transform | None = None) -> list:
        """Check every item, then fetch the URLs; errors are prefixed with the item's label.

        Without a transform, arrays and tensors come back as uint8 RGB arrays (h, w, 3) and PIL images as they are;
        with one, items are kept as given (the transform decides what it accepts).
        """
        loaded = []
        for item, label in zip(items, labels, strict=True):
            try:
                if isinstance(item, str):
                    check_url(item, policy=self.url_policy)
                elif isinstance(item, Image.Image):
                    if item.width == 0 or item.height == 0:
                        raise ValueError("the image is empty")
                elif isinstance(item, np.ndarray | torch.Tensor):
                    item = item if transform is not None else array_to_rgb(item)
                else:
                    raise TypeError("expected a PIL image, a numpy array, a torch tensor or an http(s) URL")
            except (TypeError, ValueError) as err:  # URL errors name the URL already
                message = f"{label}: {err}" if isinstance(item, str) else f"{label}: {describe(item)}: {err}"
                raise (TypeError if isinstance(err, TypeError) else ValueError)(message) from err
            loaded.append(item)
        urls = {i: item for i, item in enumerate(loaded) if isinstance(item, str)}

        def fetch(i: int) -> Image.Image:
            try:
                return fetch_image(urls[i], policy=self.url_policy)
            except ValueError as err:
                raise ValueError(f"{labels[i]}: {err}") from err

        if len(urls) > 1:  # network-bound: fetch concurrently
            with ThreadPoolExecutor(max_workers=min(len(urls), 8)) as pool:
                fetched = list(pool.map(fetch, urls))
        else:
            fetched = [fetch(i) for i in urls]
        for i, image in zip(urls, fetched, strict=True):
            loaded[i] = image
        return loaded

    def pixel_values(
        self,
        images: Sequence[ImageLike],
        *,
        labels: Sequence[str],
        image_size: int | None = None,
        transform: Transform | None = None,
    ) -> torch.Tensor:
        """Images returned by `load` to a float32 tensor (n, 3, r, r)."""
        size = self.image_size if image_size is None else image_size
        if size < 1:
            raise ValueError(f"image_size must be positive, got {size}")
        if not images:
            return torch.zeros(0, 3, size, size)
        if transform is not None:
            return _apply_transform(images, labels=labels, transform=transform)
        scale, shift = self._scale_and_shift()
        out = np.empty((len(images), 3, size, size), dtype=np.float32)  # (n, 3, r, r)
        # The same lazy PIL image may appear twice; decoding it from two threads at once is not safe.
        first = {}
        for i, image in enumerate(images):
            first.setdefault(id(image), i)
        unique = sorted(set(first.values()))

        def process(i: int) -> None:
            rgb = self._resize(images[i], size=size, label=labels[i]).transpose(2, 0, 1)  # (3, r, r) uint8
            np.multiply(rgb, scale, out=out[i])
            out[i] += shift

        workers = min(len(unique), self.num_workers or os.cpu_count() or 1)
        if workers > 1:  # PIL decodes and resizes, and numpy computes, without holding the GIL
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(process, unique))
        else:
            for i in unique:
                process(i)
        for i, image in enumerate(images):
            if first[id(image)] != i:
                out[i] = out[first[id(image)]]
        return torch.from_numpy(out)

    def _resize(self, image: Image.Image | np.ndarray, *, size: int, label: str) -> np.ndarray:
        """One image to uint8 RGB (r, r, 3); a lazy PIL image is decoded here."""
        try:
            rgb = pil_to_rgb(image) if isinstance(image, Image.Image) else Image.fromarray(image)
            return np.asarray(rgb.resize((size, size), resample=self.resample))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"{label}: could not decode {describe(image)}: {err}") from err

    def _scale_and_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """(x · rescale_factor − mean) / std as one multiply-add: float32 (3, 1, 1) factors computed in float64."""
        mean, std = np.array(self.image_mean), np.array(self.image_std)
        scale = (self.rescale_factor / std).astype(np.float32).reshape(3, 1, 1)
        shift = (-mean / std).astype(np.float32).reshape(3, 1, 1)
        return scale, shift

    def to_dict(self) -> dict:
        """The `preprocessor_config.json` fields, in the 2023 hub spelling."""
        return {
            "image_processor_type": "IdeficsImageProcessor",
            "processor_class": "IdeficsProcessor",
            "image_size": self.image_size,
            "image_num_channels": 3,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": int(self.resample),
        }

    @classmethod
    def from_dict(cls, config: dict, **kwargs) -> "IdeficsImageProcessor":
        """Build from a config dict in either spelling (`image_size` or `size`); unknown keys are ignored."""
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(flag) is False:
                raise ValueError(f"image processor config sets {flag}=false, which is not supported")
        if config.get("do_center_crop") or config.get("do_pad"):
            raise ValueError("image processor config asks for center cropping or padding, which IDEFICS does not use")
        if config.get("image_num_channels", 3) != 3:
            raise ValueError(f"image_num_channels must be 3, got {config['image_num_channels']}")
        image_size = config.get("image_size")
        size = config.get("size")
        if image_size is None and isinstance(size, dict):
            if size.get("height") != size.get("width"):
                raise ValueError(f"IDEFICS images are square, got size {size}")
            image_size = size["height"]
        names = ("image_mean", "image_std", "rescale_factor", "resample")
        fields = {name: config[name] for name in names if config.get(name) is not None}
        if image_size is not None:
            fields["image_size"] = image_size
        return cls(**(fields | kwargs))  # kwargs override the file

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, revision: str | None = None, **kwargs):
        """Load from a folder or hub id holding `preprocessor_config.json` or `processor_config.json`.

        `kwargs` set fields that are not in the file (`num_workers`, `url_policy`) or override those that are.
        """
        folder = resolve_folder(path_or_hub_id, filenames=[CONFIG_NAME, PROCESSOR_CONFIG_NAME], revision=revision)
        return cls.from_dict(read_image_processor_config(folder), **kwargs)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `preprocessor_config.json` (the 2023 hub layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_image_processor_config(folder: Path) -> dict:
    """The image processor's config from either layout in `folder`."""
    if (folder / CONFIG_NAME).is_file():
        return json.loads((folder / CONFIG_NAME).read_text())
    if (folder / PROCESSOR_CONFIG_NAME).is_file():
        config = json.loads((folder / PROCESSOR_CONFIG_NAME).read_text())
        if isinstance(config.get("image_processor"), dict):
            return config["image_processor"]
    raise FileNotFoundError(f"{folder} has neither {CONFIG_NAME} nor an image processor in {PROCESSOR_CONFIG_NAME}")


def _apply_transform(images: Sequence[ImageLike], *, labels: Sequence[str], transform: Transform) -> torch.Tensor:
    """Run a user transform image by image (sequentially: augmentations often share a random state)."""
    outputs = []
    for image, label in zip(images, labels, strict=True):
        out = transform(image)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{label}: the transform returned {type(out).__name__}, expected a torch.Tensor")
        if outputs and out.shape != outputs[0].shape:
            raise ValueError(
                f"{label}: the transform returned shape {tuple(out.shape)}, others {tuple(outputs[0].shape)}"
            )
        outputs.append(out)
    return torch.stack(outputs)  # (n, c, h, w)
