"""URL and data-URL image loading: limits, content checks and error messages, against a local HTTP server."""

import base64

import pytest
from PIL import Image

from idefics.processing.fetch import UrlPolicy, decode_data_url, fetch_image, is_url

from .conftest import encode, pattern

POLICY = UrlPolicy()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://example.com/a.jpg", True),
        ("https://example.com", True),
        ("ftp://host/x.png", True),  # a URL, refused later for its scheme
        ("hello world", False),
        ("see http://example.com/a.jpg", False),
        ("User:", False),
        ("a:b", False),
        ("file:///etc/passwd", False),  # no host: text, as in the reference
        ("http://[::1", False),
        ("", False),
    ],
)
def test_is_url(text, expected):
    assert is_url(text) is expected


def test_fetches_and_applies_exif_orientation(image_server):
    base, _ = image_server
    image = fetch_image(f"{base}/photo.jpg", policy=POLICY)
    assert image.size == (320, 240)
    assert fetch_image(f"{base}/rotated.jpg", policy=POLICY).size == (240, 320)
    assert fetch_image(f"{base}/to-photo", policy=POLICY).size == (320, 240)
    assert fetch_image(f"{base}/binary", policy=POLICY).size == (320, 240)  # application/octet-stream


@pytest.mark.parametrize(
    ("path", "policy", "message"),
    [
        ("/missing", POLICY, "could not fetch '{url}': HTTP Error 404: Not Found"),
        ("/page.html", POLICY, "'{url}' is not an image: its content type is 'text/html; charset=utf-8'"),
        ("/photo.jpg", UrlPolicy(max_bytes=1000), r"'{url}' is \d+ bytes, over the limit of 1000"),
        ("/unsized.jpg", UrlPolicy(max_bytes=1000), "'{url}' is over the limit of 1000 bytes"),
        ("/corrupt.jpg", POLICY, "'{url}': not a readable image"),
        ("/truncated.png", POLICY, "'{url}': not a readable image"),
        ("/to-file", POLICY, "could not fetch '{url}': .*'file:///etc/passwd' is not allowed"),  # urllib refuses
        ("/to-ftp", POLICY, "could not fetch '{url}': redirected to a non-http\\(s\\) URL 'ftp://127.0.0.1/x.png'"),
        ("/hang", UrlPolicy(timeout=0.3), "could not fetch '{url}': .*timed out"),
        ("/photo.jpg", UrlPolicy(enabled=False), "URL fetching is disabled, cannot load '{url}'"),
    ],
)
def test_fetch_errors_name_the_url(image_server, path, policy, message):
    base, state = image_server
    photo = state.routes["/photo.jpg"][2]
    state.routes["/unsized.jpg"] = (200, {"Content-Type": "image/jpeg", "X-Omit-Length": "1"}, photo)
    url = f"{base}{path}"
    with pytest.raises(ValueError, match=message.format(url=url)):
        fetch_image(url, policy=policy)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused(image_server, monkeypatch):
    base, _ = image_server
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # the photo has 76,800 pixels: PIL would only warn
    with pytest.raises(ValueError, match="photo.jpg': refused as a decompression bomb"):
        fetch_image(f"{base}/photo.jpg", policy=POLICY)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # over twice the cap: PIL's own error
    with pytest.raises(ValueError, match="photo.jpg': refused as a decompression bomb"):
        fetch_image(f"{base}/photo.jpg", policy=POLICY)


def test_non_http_schemes_are_refused_without_network():
    with pytest.raises(ValueError, match="only http and https URLs can be fetched, got scheme 'ftp'"):
        fetch_image("ftp://127.0.0.1/x.png", policy=POLICY)


def test_data_urls():
    png = encode(Image.fromarray(pattern(20, 10, 0)), "PNG")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert decode_data_url(url, max_bytes=10_000).size == (20, 10)
    with pytest.raises(ValueError, match="over the limit of 100 bytes"):
        decode_data_url(url, max_bytes=100)
    with pytest.raises(ValueError, match="not valid base64"):
        decode_data_url("data:image/png;base64,@@@@", max_bytes=10_000)
    with pytest.raises(ValueError, match="expected a base64 image data URL"):
        decode_data_url("data:text/plain,hello", max_bytes=10_000)
    with pytest.raises(ValueError, match="not a readable image"):
        decode_data_url("data:image/png;base64," + base64.b64encode(b"garbage").decode(), max_bytes=10_000)
