"""Session fixtures for the processing tests: a small LLaMA-style tokenizer trained here, checkpoint folders in both
layouts, the transformers reference processor, sample images of every kind, and a local HTTP image server."""

import io
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizer_fixture import EXTRA_TOKENS
from transformers import AutoTokenizer
from transformers import IdeficsProcessor as RefProcessor
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

from idefics.processing import IdeficsProcessor


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False}


@pytest.fixture(scope="session")
def hub2023_dir(v5_dir, tmp_path_factory) -> Path:
    """The same tokenizer in the layout of the 2023 hub checkpoints: preprocessor_config.json, special_tokens_map.json
    with `additional_special_tokens`, a tokenizer_config.json with AddedToken dicts and add_bos_token."""
    folder = tmp_path_factory.mktemp("hub2023")
    shutil.copy(v5_dir / "tokenizer.json", folder / "tokenizer.json")
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>"),
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>"),
    }
    special_tokens_map = {
        "additional_special_tokens": EXTRA_TOKENS,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
    }
    preprocessor_config = {
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_num_channels": 3,
        "image_processor_type": "IdeficsImageProcessor",
        "image_size": 224,
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "IdeficsProcessor",
    }
    for name, content in [
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_tokens_map),
        ("preprocessor_config.json", preprocessor_config),
    ]:
        (folder / name).write_text(json.dumps(content, indent=2))
    return folder


def reference_processor(folder: Path):
    """transformers' IdeficsProcessor with the PIL-backend image processor, from `folder`."""
    return RefProcessor(
        image_processor=IdeficsImageProcessorPil.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(folder),
    )


@pytest.fixture(scope="session")
def ref_processor(v5_dir):
    return reference_processor(v5_dir)


@pytest.fixture(scope="session")
def processor(v5_dir) -> IdeficsProcessor:
    """Ours, shared by the session: tests must not change it."""
    return IdeficsProcessor.from_pretrained(v5_dir)


def pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth colour gradient with noise, uint8 (h, w, 3): something bicubic resizing does not flatten."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def sample_images() -> dict[str, object]:
    """One image per supported input kind, each with a different size and content."""
    rgb = pattern(96, 64, 0)
    alpha = np.linspace(0, 255, 80 * 50, dtype=np.float64).reshape(50, 80).astype(np.uint8)
    rgba = np.dstack([pattern(80, 50, 1), alpha])
    palette = Image.fromarray(pattern(70, 70, 2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    wide = (pattern(60, 40, 3)[..., 0].astype(np.uint16) * 250).astype(np.uint16)
    return {
        "pil_rgb": Image.fromarray(rgb),
        "pil_rgba": Image.fromarray(rgba),
        "pil_p_transparency": palette,
        "pil_la": Image.fromarray(np.ascontiguousarray(rgba[..., [0, 3]])),
        "pil_l": Image.fromarray(pattern(33, 47, 4)[..., 1]),
        "pil_cmyk": Image.fromarray(rgb).convert("CMYK"),
        "pil_i16": Image.fromarray(wide),
        "pil_1": Image.fromarray(pattern(64, 64, 5)[..., 0] > 128),
        "jpeg_lazy": Image.open(io.BytesIO(encode(Image.fromarray(pattern(640, 480, 6)), "JPEG", quality=90))),
        "png_lazy": Image.open(io.BytesIO(encode(Image.fromarray(pattern(300, 200, 7)), "PNG"))),
        "array_uint8": pattern(50, 90, 8),
        "array_float_integers": pattern(41, 37, 9).astype(np.float32),
        "array_gray_hw1": pattern(30, 20, 10)[..., :1],
        "array_rgba": rgba,
        "tensor_uint8": torch.from_numpy(pattern(64, 48, 11)).permute(2, 0, 1),
        "tensor_float_integers": torch.from_numpy(pattern(20, 30, 12)).permute(2, 0, 1).double(),
        "tiny_1x1": Image.fromarray(pattern(1, 1, 13)),
        "large_2000x1500": Image.fromarray(pattern(2000, 1500, 14)),
    }


class _Routes:
    """What the test server answers: path -> (status, headers, body)."""

    def __init__(self):
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.release = threading.Event()  # lets the /hang handler finish at teardown


@pytest.fixture(scope="session")
def image_server():
    """An HTTP server on 127.0.0.1 in a thread. Returns (base URL, routes); tests may add routes."""
    state = _Routes()
    photo = Image.fromarray(pattern(320, 240, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°
    state.routes.update(
        {
            "/photo.jpg": (200, {"Content-Type": "image/jpeg"}, encode(photo, "JPEG", quality=92)),
            "/rotated.jpg": (200, {"Content-Type": "image/jpeg"}, encode(photo, "JPEG", exif=exif)),
            "/graph.png": (200, {"Content-Type": "image/png"}, encode(Image.fromarray(pattern(150, 100, 21)), "PNG")),
            "/binary": (200, {"Content-Type": "application/octet-stream"}, encode(photo, "PNG")),
            "/page.html": (200, {"Content-Type": "text/html; charset=utf-8"}, b"<html>not an image</html>"),
            "/corrupt.jpg": (200, {"Content-Type": "image/jpeg"}, b"\xff\xd8\xff\xe0 this is not a jpeg"),
            "/truncated.png": (200, {"Content-Type": "image/png"}, encode(photo, "PNG")[:2000]),
            "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
            "/to-ftp": (302, {"Location": "ftp://127.0.0.1/x.png"}, b""),
            "/to-photo": (302, {"Location": "/photo.jpg"}, b""),
        }
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/hang":
                state.release.wait(timeout=30)
                return
            status, headers, body = state.routes.get(self.path, (404, {}, b"not found"))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "X-Omit-Length" not in headers:  # without it the body ends when the connection closes
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    state.release.set()
    server.shutdown()
    server.server_close()
