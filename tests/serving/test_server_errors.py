"""Bad requests to `idefics serve`: each is a 4xx in OpenAI's error shape that says why, and the server keeps
answering. Remote images are allowed here, so the address checks run for real; the only connections made are to
loopback (a local image server, reachable as `localhost`, which --allowed-media-domains exempts)."""

import base64
import io

import httpx
import pytest
from PIL import Image
from server_process import EXAMPLES, RED_CIRCLE, ServerProcess, ask, http_routes

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


ROUTES = {  # the loopback image server: the red circle, redirects to refused addresses, too large, not an image
    "/red.png": (200, {"Content-Type": "image/png"}, (EXAMPLES / "red_circle.png").read_bytes()),
    "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    "/to-private": (302, {"Location": "http://10.1.2.3/red.png"}, b""),
    "/to-loopback": (302, {"Location": "http://127.0.0.1:9/red.png"}, b""),
    "/big.png": (200, {"Content-Type": "image/png"}, b"\x89PNG" + bytes(300_000)),
    "/page": (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),
}


@pytest.fixture(scope="module")
def images():
    with http_routes(ROUTES) as port:
        yield f"localhost:{port}"


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--api-key", KEY, "--allow-remote-images", "--allowed-media-domains", "localhost",
                            "--allowed-local-media-path", str(EXAMPLES), "--max-images-per-request", "2",
                            "--max-image-bytes", "100000", "--max-image-pixels", "1000000",
                            "--max-request-bytes", "1000000")  # fmt: skip
    yield process
    process.stop()


def chat_body(messages=None, **fields) -> dict:
    return {"model": "idefics-demo", "messages": messages or ask("What color is the shape?"), "temperature": 0,
            "max_tokens": 8, **fields}  # fmt: skip


def image_body(url: str) -> dict:
    return chat_body(ask("What color is the shape?", url))


LONG_PROMPT = "Describe the image. " * 200
BAD_REQUESTS = {  # name -> (path, JSON body or raw bytes, expected status, part of the message)
    "bad JSON": ("chat", b'{"messages": [', 400, "not valid JSON"),
    "wrong type": ("chat", chat_body(max_tokens="many"), 400, "max_tokens"),
    "messages not a list": ("chat", chat_body(messages="hi"), 400, "messages"),
    "empty messages": ("chat", {"messages": []}, 400, "messages"),
    "unknown role": ("chat", chat_body([{"role": "robot", "content": "hi"}]), 400, "role"),
    "content a number": ("chat", chat_body([{"role": "user", "content": 5}]), 400, "content"),
    "unknown part type": ("chat", chat_body([{"role": "user", "content": [{"type": "audio"}]}]), 400, "audio"),
    "image token in text": ("chat", chat_body(ask("What is <image>?")), 400, "<image>"),
    "bad base64": ("chat", image_body("data:image/png;base64,!!not-base64!!"), 400, "not valid base64"),
    "not an image": ("chat", image_body(data_url(b"hello, world")), 400, "not a readable image"),
    "image over the byte cap": ("chat", image_body(data_url(bytes(150_000))), 400, "over the limit of 100000"),
    "decompression bomb": ("chat", image_body(data_url(png((2000, 2000), "1"))), 400, "decompression bomb"),
    "too many images": (
        "chat",
        chat_body([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED_CIRCLE}}] * 3}]),
        400,
        "3 images",
    ),  # fmt: skip
    "127.0.0.1": ("chat", image_body("http://127.0.0.1:9/a.png"), 400, "a loopback address"),
    "metadata address": ("chat", image_body("http://169.254.169.254/latest/meta-data/"), 400, "link-local"),
    "private address": ("chat", image_body("http://10.0.0.1/a.png"), 400, "a private address"),
    "[::1]": ("chat", image_body("http://[::1]:9/a.png"), 400, "a loopback address"),
    "2130706433": ("chat", image_body("http://2130706433:9/a.png"), 400, "resolves to 127.0.0.1"),
    "file outside the folder": ("chat", image_body("file:///etc/passwd"), 400, "outside the allowed folder"),
    "file via ..": ("chat", image_body((EXAMPLES / ".." / "README.md").as_uri()), 400, "outside the allowed"),
    "negative max_tokens": ("chat", chat_body(max_tokens=-1), 400, "max_tokens"),
    "huge max_tokens": ("chat", chat_body(max_tokens=10**6), 400, "maximum context length is 512 tokens"),
    "prompt over the context": (
        "chat",
        chat_body(ask(LONG_PROMPT), max_tokens=None),
        400,
        "maximum context length is 512 tokens, you asked for",
    ),  # fmt: skip
    "top_logprobs 21": ("chat", chat_body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    "negative temperature": ("chat", chat_body(temperature=-1), 400, "temperature"),
    "n = 0": ("chat", chat_body(n=0), 400, "n"),
    "min_tokens over max_tokens": ("chat", chat_body(min_tokens=20), 400, "min_tokens"),
    "empty stop string": ("chat", chat_body(stop=[""]), 400, "stop"),
    "logit_bias key not a token id": ("chat", chat_body(logit_bias={"red": 5}), 400, "token ids, got 'red'"),
    "logit_bias value over 100": ("chat", chat_body(logit_bias={"7": 101}), 400, "got 101.0 for token 7"),
    "logit_bias id outside the vocabulary": ("chat", chat_body(logit_bias={"100000": 1}), 400, "token id 100000"),
    "unknown model": ("chat", chat_body(model="gpt-4"), 404, "'gpt-4' does not exist"),
    "body too large": ("chat", chat_body(padding="x" * 1_100_000), 413, "over the limit of 1000000"),
    "image markers and images differ": (
        "completions",
        {"prompt": "<image><image>Hi", "images": [RED_CIRCLE]},
        400,
        "2 <image> markers but 1 images",
    ),  # fmt: skip
    "token id outside the vocabulary": ("completions", {"prompt": [1, 10**6]}, 400, "outside the vocabulary"),
}
REMOTE = {  # through the local image server: name -> (path on it, expected message part)
    "redirect to the metadata address": ("/to-metadata", "169.254.169.254, a link-local"),
    "redirect to a private address": ("/to-private", "10.1.2.3, a private address"),
    "redirect to loopback": ("/to-loopback", "127.0.0.1, a loopback address"),
    "remote image over the byte cap": ("/big.png", "over the limit of 100000"),
    "remote page, not an image": ("/page", "not an image"),
}


def post(server, path: str, body, headers=AUTH) -> httpx.Response:
    url = f"{server.base_url}/v1/{'chat/completions' if path == 'chat' else path}"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, headers=headers, timeout=60)


def check_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["type"], str), error
    assert message in error["message"], error["message"]


def test_the_local_image_server_is_reachable_through_the_allowed_domain(server, images):
    reply = post(server, "chat", image_body(f"http://{images}/red.png"))
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "Red."


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_are_4xx_in_openai_shape(server, name):
    path, body, status, message = BAD_REQUESTS[name]
    check_error(post(server, path, body), status, message)


@pytest.mark.parametrize("name", list(REMOTE))
def test_bad_remote_images_are_400(server, images, name):
    path, message = REMOTE[name]
    check_error(post(server, "chat", image_body(f"http://{images}{path}")), 400, message)


def test_auth_method_and_route_errors(server):
    check_error(post(server, "chat", chat_body(), headers={"Authorization": "Bearer wrong"}), 401, "invalid API key")
    check_error(post(server, "chat", chat_body(), headers={}), 401, "invalid API key")
    chunked = (part for part in [b'{"messages": "', b"x" * 600_000, b"x" * 600_000, b'"}'])  # no Content-Length
    check_error(httpx.post(server.base_url + "/v1/chat/completions", content=chunked, headers=AUTH), 413,
                "over the limit of 1000000")  # fmt: skip
    check_error(httpx.get(server.base_url + "/v1/chat/completions", headers=AUTH), 405, "Method Not Allowed")
    check_error(httpx.get(server.base_url + "/v1/nothing", headers=AUTH), 404, "Not Found")


def test_the_server_still_answers_after_all_that(server):
    assert len(BAD_REQUESTS) + len(REMOTE) >= 25
    assert server.health() == 200
    reply = post(server, "chat", chat_body())
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "Red."
