"""The server's image loading: the address check (with name resolution stubbed: nothing here connects to a private
address), redirects, caps, data URLs, file:// confinement and decompression bombs. Connections go to loopback
only, to a local server that --allowed-media-domains style exemptions let through."""

import asyncio
import base64
import io
import ipaddress

import httpx
import pytest
from PIL import Image
from server_process import http_routes

from idefics.serving import media
from idefics.serving.media import MediaError, MediaPolicy, checked_address, load_image, pinned_request, refusal

RED = io.BytesIO()
Image.new("RGB", (20, 10), (255, 0, 0)).save(RED, format="PNG")
RED_PNG = RED.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def load(url: str, **policy) -> Image.Image:
    return asyncio.run(load_image(url, policy=MediaPolicy(**policy)))


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("fe80::1", "link-local (cloud metadata)"),
        ("fd00:ec2::254", "private"),  # AWS's IPv6 metadata address
        ("100.100.100.200", "not globally routable"),  # Alibaba's metadata address, in the shared 100.64/10
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_refusal_by_address(address, why):
    assert refusal(ipaddress.ip_address(address)) == why


def stub_resolver(monkeypatch, table: dict[str, list[str]]) -> list[str]:
    """Replace name resolution by `table`; returns the list of hosts looked up."""
    asked = []

    async def resolve(host, port):
        asked.append(host)
        return table[host]

    monkeypatch.setattr(media, "resolve", resolve)
    return asked


def check(url: str, **policy) -> str | None:
    return asyncio.run(checked_address(url, policy=MediaPolicy(allow_remote=True, **policy)))


def test_every_resolved_address_is_checked(monkeypatch):
    stub_resolver(monkeypatch, {"cdn.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.0.0.5"],
                                "meta.example": ["169.254.169.254"], "v6.example": ["::1"]})  # fmt: skip
    assert check("https://cdn.example/cat.png") == "93.184.216.34"
    with pytest.raises(MediaError, match=r"'mixed.example' resolves to 10.0.0.5, a private address"):
        check("http://mixed.example/cat.png")
    with pytest.raises(MediaError, match="169.254.169.254, a link-local"):
        check("http://meta.example/latest/meta-data/")
    with pytest.raises(MediaError, match="::1, a loopback address"):
        check("http://v6.example:8080/x.png")


def test_allowed_domains_skip_the_check_without_resolving(monkeypatch):
    asked = stub_resolver(monkeypatch, {"internal.corp": ["10.0.0.7"]})
    assert check("http://Internal.Corp/x.png", allowed_domains=("internal.corp",)) is None
    assert asked == []
    with pytest.raises(MediaError, match="a private address"):
        check("http://internal.corp/x.png", allowed_domains=("other.corp",))


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "2130706433", "[::1]", "127.1", "0x7f.0.0.1"])
def test_loopback_spellings_are_refused_with_the_real_resolver(host):
    with pytest.raises(MediaError, match="refused|cannot resolve"):
        check(f"http://{host}:9/x.png")


def test_urls_that_are_not_http_or_have_no_host_are_refused():
    for url, message in [("ftp://example.com/x.png", "only http and https"), ("http:///x.png", "has no host"),
                         ("http://example.com:port/x.png", "malformed")]:  # fmt: skip
        with pytest.raises(MediaError, match=message):
            check(url)


def test_the_connection_goes_to_the_checked_address():
    request = pinned_request(httpx.AsyncClient(), "https://cdn.example:8443/a/b.png?x=1", "93.184.216.34")
    assert str(request.url) == "https://93.184.216.34:8443/a/b.png?x=1"
    assert request.headers["Host"] == "cdn.example:8443" and request.extensions["sni_hostname"] == "cdn.example"
    request = pinned_request(httpx.AsyncClient(), "http://v6.example/x.png", "2606:4700::1")
    assert str(request.url) == "http://[2606:4700::1]/x.png" and request.headers["Host"] == "v6.example"


ROUTES = {
    "/red.png": (200, {"Content-Type": "image/png"}, RED_PNG),
    "/hop": (302, {"Location": "/red.png"}, b""),
    "/loop": (302, {"Location": "/loop"}, b""),
    "/to-metadata": (307, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    "/big": (200, {"Content-Type": "image/png"}, bytes(5000)),
}


@pytest.fixture(scope="module")
def local():
    with http_routes(ROUTES) as port:
        yield f"http://localhost:{port}"


def test_fetching_follows_redirects_and_checks_every_hop(local, monkeypatch):
    sent = []
    send = httpx.AsyncClient.send

    async def recording_send(self, request, **kwargs):
        sent.append(request.url.host)
        return await send(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", recording_send)
    policy = dict(allow_remote=True, allowed_domains=("localhost",), max_bytes=1000)
    assert load(f"{local}/red.png", **policy).size == (20, 10)
    assert load(f"{local}/hop", **policy).size == (20, 10)
    with pytest.raises(MediaError, match="169.254.169.254, a link-local"):
        load(f"{local}/to-metadata", **policy)
    assert "169.254.169.254" not in sent  # refused before connecting
    with pytest.raises(MediaError, match="more than 3 redirects"):
        load(f"{local}/loop", **policy)
    with pytest.raises(MediaError, match="over the limit of 1000"):
        load(f"{local}/big", **policy)
    with pytest.raises(MediaError, match="HTTP 404"):
        load(f"{local}/missing", **policy)
    with pytest.raises(MediaError, match="a loopback address"):
        load(f"{local}/red.png", allow_remote=True)  # localhost not exempt
    with pytest.raises(MediaError, match="--allow-remote-images"):
        load(f"{local}/red.png")


def test_a_server_that_never_answers_times_out():
    async def main():
        server = await asyncio.start_server(lambda r, w: asyncio.Event().wait(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        policy = MediaPolicy(allow_remote=True, allowed_domains=("127.0.0.1",), timeout=0.3)
        try:
            await load_image(f"http://127.0.0.1:{port}/x.png", policy=policy)
        finally:
            server.close()

    with pytest.raises(MediaError, match="took longer than 0.3 s"):
        asyncio.run(main())


def test_data_urls():
    assert load(data_url(RED_PNG)).getpixel((0, 0)) == (255, 0, 0)
    for url, message in [
        ("data:image/png;base64,***", "not valid base64"),
        ("data:image/png,rawbytes", "not base64"),
        (data_url(b"GIF89a? no"), "not a readable image"),
        (data_url(bytes(3000)), "over the limit of 2000"),
    ]:
        with pytest.raises(MediaError, match=message):
            load(url, max_bytes=2000)


def test_decompression_bombs_are_refused_before_decoding():
    bomb = io.BytesIO()
    Image.new("1", (4000, 4000)).save(bomb, format="PNG")  # 16 M pixels in a few kB
    assert len(bomb.getvalue()) < 10_000
    with pytest.raises(MediaError, match="decompression bomb"):
        load(data_url(bomb.getvalue()), max_pixels=1_000_000)
    assert load(data_url(bomb.getvalue()), max_pixels=20_000_000).size == (4000, 4000)


def test_file_urls_stay_inside_the_allowed_folder(tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "secret"
    inside.mkdir()
    outside.mkdir()
    (inside / "red.png").write_bytes(RED_PNG)
    (outside / "red.png").write_bytes(RED_PNG)
    (inside / "link.png").symlink_to(outside / "red.png")
    assert load((inside / "red.png").as_uri(), allowed_local_path=inside).size == (20, 10)
    for url, message in [
        ((outside / "red.png").as_uri(), "outside the allowed folder"),
        (f"file://{inside}/../secret/red.png", "outside the allowed folder"),
        ((inside / "link.png").as_uri(), "outside the allowed folder"),  # symbolic links are resolved first
        ((inside / "none.png").as_uri(), "no such file"),
        (f"file://otherhost{inside}/red.png", "names a host"),
    ]:
        with pytest.raises(MediaError, match=message):
            load(url, allowed_local_path=inside)
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        load((inside / "red.png").as_uri())


def test_other_schemes_and_bad_policies():
    with pytest.raises(MediaError, match="unsupported image URL"):
        load("gopher://example.com/x")
    with pytest.raises(MediaError, match="unsupported image URL"):
        load("/etc/passwd")
    with pytest.raises(ValueError, match="MediaPolicy.max_bytes must be positive"):
        MediaPolicy(max_bytes=0)
