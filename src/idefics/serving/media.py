"""Images in requests, loaded safely: the server fetches what strangers send, so every source is checked first.

- `data:image/...;base64,...` URLs are always accepted (up to `max_bytes`).
- `http(s)://` URLs only with `allow_remote`. Every address the host resolves to, and every redirect hop, must be a
  public address: loopback, private, link-local (cloud metadata at 169.254.169.254), shared, multicast and reserved
  addresses are refused before any connection, unless `allowed_domains` names the host. The connection goes to the
  address that was checked (no second lookup that DNS rebinding could answer differently). Downloads have a deadline,
  a byte cap and at most `max_redirects` hops, and run on the event loop without blocking it.
- `file://` URLs only under `allowed_local_path`, after resolving `..` and symbolic links.
- Images with more than `max_pixels` pixels are refused from their header, before any pixel is decoded.

Every failure is a `MediaError` (a `ValueError`) whose message says which URL and why; the server answers 400.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from ..processing.fetch import ACCEPTED_CONTENT_TYPES, data_url_bytes, decode_image

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix: a gateway forwards to the IPv4 address inside


class MediaError(ValueError):
    """An image that cannot be used: refused by policy, unreachable, too large, or not an image."""


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from and how large they may be."""

    allow_remote: bool = False  # fetch http(s) URLs at all
    allowed_domains: tuple[str, ...] = ()  # hosts exempt from the public-address check (e.g. an internal CDN)
    allowed_local_path: Path | None = None  # file:// URLs must resolve inside this folder; None: no file:// URLs
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 50_000_000  # width x height of one image, checked before decoding
    timeout: float = 10.0  # seconds for one whole download, redirects included
    max_redirects: int = 3

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MediaPolicy.{name} must be positive, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise ValueError(f"MediaPolicy.max_redirects must be >= 0, got {self.max_redirects}")
        object.__setattr__(self, "allowed_domains", tuple(d.lower().rstrip(".") for d in self.allowed_domains))


def short(url: str, limit: int = 60) -> str:
    """The URL for an error message: data URLs and long URLs cut to `limit` characters."""
    return repr(url if len(url) <= limit else url[:limit] + "...")


async def load_image(url: str, *, policy: MediaPolicy) -> Image.Image:
    """One image from a `data:`, `http(s)://` or `file://` URL under `policy`, decoded (in a worker thread)."""
    if not isinstance(url, str) or not url:
        raise MediaError(f"expected an image URL string, got {url!r}")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        try:
            data = data_url_bytes(url, max_bytes=policy.max_bytes)
        except ValueError as err:
            raise MediaError(str(err)) from None
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MediaError(f"image URL {short(url)} is remote; this server only accepts data: URLs (start it with"
                             " --allow-remote-images to fetch http(s) URLs)")  # fmt: skip
        try:
            data = await asyncio.wait_for(fetch(url, policy=policy), policy.timeout)
        except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11 on
            raise MediaError(f"fetching {short(url)} took longer than {policy.timeout} s") from None
    elif scheme == "file":
        data = await asyncio.to_thread(read_local_file, url, policy=policy)
    else:
        raise MediaError(f"unsupported image URL {short(url)}: expected a data:, http(s):// or file:// URL")
    try:
        return await asyncio.to_thread(decode_image, data, source=f"image {short(url)}", max_pixels=policy.max_pixels)
    except ValueError as err:
        raise MediaError(str(err)) from None


def read_local_file(url: str, *, policy: MediaPolicy) -> bytes:
    """The bytes of a `file://` URL, which must resolve to a file inside `policy.allowed_local_path`."""
    if policy.allowed_local_path is None:
        raise MediaError(f"file URL {short(url)} refused: start the server with --allowed-local-media-path")
    parts = urllib.parse.urlparse(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL {short(url)} names a host; only local files can be read")
    root = policy.allowed_local_path.resolve()
    path = Path(urllib.parse.unquote(parts.path)).resolve()
    if not path.is_relative_to(root):
        raise MediaError(f"file URL {short(url)} is outside the allowed folder {str(root)!r}")
    if not path.is_file():
        raise MediaError(f"file URL {short(url)}: no such file")
    if path.stat().st_size > policy.max_bytes:
        raise MediaError(f"file URL {short(url)} is over the limit of {policy.max_bytes} bytes")
    return path.read_bytes()


def refusal(address: IPAddress) -> str | None:
    """Why a connection to `address` is refused (a short description), or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:  # an IPv4 address spelled as IPv6 is judged as that IPv4 address
            return refusal(embedded)
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-") + (" (cloud metadata)" if kind == "link_local" else "")
    return None if address.is_global else "not globally routable"


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (tests replace this function to stub name resolution)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def checked_address(url: str, *, policy: MediaPolicy) -> str | None:
    """Check one hop's URL; return the public address to connect to, or None when `allowed_domains` exempts it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise MediaError(f"image URL {short(url)}: only http and https can be fetched")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:  # a port that is not a number
        raise MediaError(f"image URL {short(url)} is malformed: {err}") from None
    if not host:
        raise MediaError(f"image URL {short(url)} has no host")
    if host.rstrip(".") in policy.allowed_domains:
        return None
    try:
        addresses = await resolve(host, port)
    except (socket.gaierror, UnicodeError) as err:
        raise MediaError(f"image URL {short(url)}: cannot resolve host {host!r} ({err})") from None
    if not addresses:
        raise MediaError(f"image URL {short(url)}: host {host!r} has no address")
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone index
        if (why := refusal(address)) is not None:
            raise MediaError(
                f"image URL {short(url)} refused: {host!r} resolves to {address}, a {why} address"
                " (only public addresses are fetched unless --allowed-media-domains names the host)"
            )
    return addresses[0].split("%", 1)[0]


async def fetch(url: str, *, policy: MediaPolicy) -> bytes:
    """Download `url`, checking every hop's addresses before connecting to it."""
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=policy.timeout) as client:
        for hop in range(policy.max_redirects + 1):
            address = await checked_address(url, policy=policy)
            request = pinned_request(client, url, address)
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as err:
                raise MediaError(f"could not fetch {short(url)}: {err or type(err).__name__}") from None
            try:
                if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                    if hop == policy.max_redirects:
                        raise MediaError(f"image URL {short(url)}: more than {policy.max_redirects} redirects")
                    url = urllib.parse.urljoin(url, response.headers["location"])
                    continue
                return await read_body(response, url=url, max_bytes=policy.max_bytes)
            finally:
                await response.aclose()
    raise AssertionError("unreachable: the loop returns or raises")


def pinned_request(client: httpx.AsyncClient, url: str, address: str | None) -> httpx.Request:
    """A GET of `url` sent to `address` (the checked one) with the URL's own Host header and TLS server name."""
    if address is None:
        return client.build_request("GET", url, headers={"User-Agent": "idefics"})
    parts = urllib.parse.urlsplit(url)
    ip_host = f"[{address}]" if ":" in address else address
    netloc = ip_host if parts.port is None else f"{ip_host}:{parts.port}"
    host_header = parts.netloc.rsplit("@", 1)[-1]  # userinfo is never sent as part of Host
    return client.build_request(
        "GET",
        urllib.parse.urlunsplit(parts._replace(netloc=netloc)),
        headers={"Host": host_header, "User-Agent": "idefics"},
        extensions={"sni_hostname": parts.hostname} if parts.scheme == "https" else {},
    )


async def read_body(response: httpx.Response, *, url: str, max_bytes: int) -> bytes:
    """The body of a 200 image response, refused past `max_bytes` (declared or actual)."""
    if response.status_code != 200:
        raise MediaError(f"could not fetch {short(url)}: HTTP {response.status_code}")
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind and not kind.startswith("image/") and kind not in ACCEPTED_CONTENT_TYPES:
        raise MediaError(f"{short(url)} is not an image: its content type is {kind!r}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"{short(url)} is {declared} bytes, over the limit of {max_bytes}")
    chunks, size = [], 0
    try:
        async for chunk in response.aiter_bytes():  # decompressed, so the cap also stops gzip bombs
            size += len(chunk)
            if size > max_bytes:
                raise MediaError(f"{short(url)} is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except httpx.HTTPError as err:
        raise MediaError(f"could not fetch {short(url)}: {err or type(err).__name__}") from None
    return b"".join(chunks)
