"""Where a fine-tuning row's images come from, and how each is loaded again when its example is built: a file, a
`data:` URL, a fetched remote image (kept resized) or a `datasets` cell (read from the row again)."""

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..processing.fetch import decode_data_url, decode_image
from ..processing.image import describe


@dataclass(frozen=True)
class DatasetImage:
    """An image of a `datasets` row's "images" list, read from the row again each time the example is built."""

    index: int  # position in the list


# How to load an image again: a file, a `data:` URL, a fetched remote image (kept resized), or a dataset cell.
ImageSource = Path | str | Image.Image | DatasetImage


def open_image(source: ImageSource, *, max_bytes: int, row: dict | None = None) -> Image.Image:
    """Load an image from its source (`row`: the `datasets` row of a `DatasetImage`); errors are `ValueError`s."""
    if isinstance(source, Path):
        size = source.stat().st_size
        if size > max_bytes:
            raise ValueError(f"image file {source} is {size} bytes, over the limit of {max_bytes}")
        return decode_image(source.read_bytes(), source=f"image file {source}")
    if isinstance(source, str):
        return decode_data_url(source, max_bytes=max_bytes)
    if isinstance(source, DatasetImage):
        return decode_cell(row["images"][source.index], max_bytes=max_bytes)
    return source


def decode_cell(value: object, *, max_bytes: int) -> Image.Image:
    """A `datasets` image cell (a PIL image, or `{"bytes": ...}` when not decoded) to a PIL image."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        if len(value["bytes"]) > max_bytes:
            raise ValueError(f"the image is {len(value['bytes'])} bytes, over the limit of {max_bytes}")
        return decode_image(value["bytes"], source="the image")
    if not isinstance(value, Image.Image):
        raise ValueError(f"expected an image, got {describe(value)}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and value.width * value.height > limit:
        raise ValueError(f"the image is {value.width}x{value.height} pixels, over the limit of {limit}")
    return value
