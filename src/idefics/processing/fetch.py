"""Loading images from http(s) URLs, `data:` URLs and raw bytes, with limits.

Every error is a `ValueError` whose message names the URL (or the source it was given), so a bad item in a long
batch of prompts is easy to find.
"""

import base64
import binascii
import http.client
import io
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image, ImageOps

HTTP_SCHEMES = ("http", "https")
# Some CDNs serve images as generic binary; anything else (text/html, ...) is refused before decoding.
ACCEPTED_CONTENT_TYPES = ("application/octet-stream",)
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class UrlPolicy:
    """Whether and how image URLs in prompts are fetched."""

    enabled: bool = True  # False: a URL item is an error, nothing is fetched
    timeout: float = 10.0  # seconds for the whole download
    max_bytes: int = 20 * 1024 * 1024  # larger bodies are refused


def is_url(text: str) -> bool:
    """Whether `text` is a URL and nothing else: no space, a scheme and a host (the reference's rule)."""
    if " " in text:
        return False
    try:
        parts = urllib.parse.urlparse(text)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return False
    return bool(parts.scheme and parts.netloc)


def check_url(url: str, *, policy: UrlPolicy) -> None:
    """Raise unless `url` may be fetched under `policy` (no network access)."""
    if not policy.enabled:
        raise ValueError(f"URL fetching is disabled, cannot load {url!r}")
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in HTTP_SCHEMES:
        raise ValueError(f"only http and https URLs can be fetched, got scheme {scheme!r} in {url!r}")


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never to another scheme (urllib would also follow ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme not in HTTP_SCHEMES:
            raise urllib.error.URLError(f"redirected to a non-http(s) URL {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str, *, policy: UrlPolicy) -> Image.Image:
    """Download and decode one image; the whole download must finish within `policy.timeout`."""
    check_url(url, policy=policy)
    opener = urllib.request.build_opener(_HttpRedirectsOnly)
    deadline = time.monotonic() + policy.timeout
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "idefics"}), timeout=policy.timeout) as r:
            content_type = r.headers.get("Content-Type")
            if content_type is not None:
                kind = r.headers.get_content_type()
                if not kind.startswith("image/") and kind not in ACCEPTED_CONTENT_TYPES:
                    raise ValueError(f"{url!r} is not an image: its content type is {content_type!r}")
            declared = r.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise ValueError(f"{url!r} is {int(declared)} bytes, over the limit of {policy.max_bytes}")
            chunks, size = [], 0
            while chunk := r.read(CHUNK_BYTES):
                size += len(chunk)
                if size > policy.max_bytes:
                    raise ValueError(f"{url!r} is over the limit of {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ValueError(f"fetching {url!r} took longer than {policy.timeout} s")
                chunks.append(chunk)
    except (OSError, http.client.HTTPException) as err:  # HTTP errors, refused connections, timeouts, cut bodies
        detail = getattr(err, "reason", err) if type(err) is urllib.error.URLError else err
        raise ValueError(f"could not fetch {url!r}: {detail}") from err
    return decode_image(b"".join(chunks), source=repr(url))


def decode_data_url(url: str, *, max_bytes: int) -> Image.Image:
    """Decode a `data:image/...;base64,...` URL, as chat clients send inline images."""
    return decode_image(data_url_bytes(url, max_bytes=max_bytes), source=f"data URL {url[:40]!r}...")


def data_url_bytes(url: str, *, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URL, refused over `max_bytes` (the decoder then decides whether they are an
    image, whatever media type the URL claims)."""
    header, sep, payload = url.partition(",")
    if not (sep and header.lower().startswith("data:") and header.lower().endswith(";base64")):
        raise ValueError(
            f"{url[:60]!r}... is not base64: expected a base64 image data URL ('data:image/...;base64,...')"
        )
    if len(payload) // 4 * 3 > max_bytes:
        raise ValueError(f"data URL {url[:40]!r}... is over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ValueError(f"data URL {url[:40]!r}... is not valid base64: {err}") from err


def decode_image(data: bytes, *, source: str, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes fully (so corrupt data fails here), refusing more than `max_pixels` (default: PIL's cap)
    from the header alone, before any pixel is decoded.

    The EXIF orientation is applied, as the reference does for downloaded images.
    """
    try:
        image = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels  # PIL only warns up to 2x its cap
        if limit is not None and image.width * image.height > limit:
            raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels is over the limit of {limit}")
        image.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"{source}: refused as a decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:  # unidentified formats and truncated data are OSErrors
        raise ValueError(f"{source}: not a readable image ({err})") from err
    return ImageOps.exif_transpose(image)
