"""`idefics serve` in a subprocess on 127.0.0.1 with a port chosen at run time, for the server tests."""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
STARTUP_S = 120  # loading torch and the model on a busy 2-core machine


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


RED_CIRCLE = data_url(EXAMPLES / "red_circle.png")
BLUE_TRIANGLE = data_url(EXAMPLES / "blue_triangle.png")


def ask(question: str, image: str | None = RED_CIRCLE) -> list[dict]:
    """One user message: the image (a URL) then the question, as OpenAI clients send it."""
    content = [{"type": "image_url", "image_url": {"url": image}}] if image else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


class ServerProcess:
    """A running `idefics serve`; its stderr is kept in `self.log` for failure messages."""

    def __init__(self, *args: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "IDEFICS_API_KEY": ""}
        command = [sys.executable, "-m", "idefics", "serve", "--port", "0", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        self.log: list[str] = []
        self.announced = threading.Event()
        self.base_url = ""
        threading.Thread(target=self._read_log, daemon=True).start()
        deadline = time.monotonic() + STARTUP_S
        if not self.announced.wait(STARTUP_S) or not self.base_url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        while self.health() != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the server did not become healthy:\n" + "".join(self.log))
            time.sleep(0.05)

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            if match := re.search(r"on (http://\S+:\d+)", line):
                self.base_url = match.group(1)
                self.announced.set()
        self.announced.set()

    def health(self) -> int | None:
        try:
            return httpx.get(self.base_url + "/health", timeout=5).status_code
        except httpx.TransportError:
            return None

    def metric(self, name: str) -> float:
        """One sample's value from /metrics: the first whose name, or name and first labels, start with `name`
        (`idefics_slots_used`, `idefics_request_success_total{finish_reason="stop"`)."""
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in "{ ,":
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{name} not in /metrics")

    def wait_for(self, condition, *, what: str, timeout: float = 60) -> None:
        """Poll `condition()` until true, or fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=60)


class Routes(http.server.BaseHTTPRequestHandler):
    """Answers GET `path` with `routes[path]` = (status, headers, body); set `routes` on a subclass."""

    routes: dict[str, tuple[int, dict, bytes]] = {}

    def do_GET(self):
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_routes(routes: dict[str, tuple[int, dict, bytes]]) -> Iterator[int]:
    """A loopback HTTP server (127.0.0.1, a free port) answering `routes`; yields its port."""
    handler = type("Handler", (Routes,), {"routes": routes})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
