"""`idefics serve` with one decode slot and a queue of one: a client that disconnects mid-stream frees its slot,
a full queue answers 429, and SIGTERM drains (503 to newcomers, in-flight requests finish) and exits 0."""

import threading
import time

import httpx
import pytest
from server_process import ServerProcess, ask

LIMITS = ("--max-batch-size", "1", "--max-queue", "1")
LONG = {"messages": ask("Describe the image."), "max_tokens": 480, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(*LIMITS)
    yield process
    process.stop()


def url(server) -> str:
    return server.base_url + "/v1/chat/completions"


def read_tokens(lines, count: int) -> list[str]:
    """The next `count` content deltas from a streamed response's `iter_lines()` (the role chunk skipped). The
    iterator is kept open: closing it would close the connection, which is how a client disconnects."""
    tokens = []
    for line in lines:
        if line.startswith("data: {") and '"content"' in line and '"role"' not in line:
            tokens.append(line)
            if len(tokens) == count:
                break
    return tokens


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    cancelled = server.metric('idefics_request_success_total{finish_reason="cancelled"')
    with httpx.stream("POST", url(server), json={**LONG, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        assert response.status_code == 200 and len(read_tokens(lines, 2)) == 2
        assert server.metric("idefics_slots_used") == 1
    # the connection is closed: the server notices, cancels the request and frees the slot
    server.wait_for(lambda: server.metric("idefics_slots_used") == 0, what="the slot to be freed")
    server.wait_for(lambda: server.metric('idefics_request_success_total{finish_reason="cancelled"') == cancelled + 1,
                    what="the request to be counted as cancelled")  # fmt: skip
    reply = httpx.post(url(server), json={**LONG, "max_tokens": 4}, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


def test_a_full_queue_answers_429(server):
    with httpx.stream("POST", url(server), json={**LONG, "stream": True}, timeout=60) as running:
        lines = running.iter_lines()
        read_tokens(lines, 1)
        with httpx.stream("POST", url(server), json={**LONG, "stream": True}, timeout=60) as waiting:
            assert waiting.status_code == 200
            server.wait_for(lambda: server.metric("idefics_requests_waiting") == 1, what="a waiting request")
            refused = httpx.post(url(server), json=LONG, timeout=60)
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["type"] == "rate_limit_error" and "overloaded" in error["message"]
    server.wait_for(lambda: server.metric("idefics_slots_used") == 0, what="both requests to end")


def test_sigterm_drains_in_flight_requests_and_exits_0():
    process = ServerProcess(*LIMITS)
    try:
        waiting_reply = {}
        with httpx.stream("POST", url(process), json={**LONG, "stream": True}, timeout=60) as running:
            lines = running.iter_lines()
            first = read_tokens(lines, 1)
            waiter = threading.Thread(target=lambda: waiting_reply.update(r=httpx.post(url(process), json=LONG,
                                                                                      timeout=60)))  # fmt: skip
            waiter.start()
            process.wait_for(lambda: process.metric("idefics_requests_waiting") == 1, what="a waiting request")
            process.terminate()
            process.wait_for(lambda: process.health() == 503, what="/health to answer 503 while draining")
            refused = httpx.post(url(process), json=LONG, timeout=60)
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
            rest = [line for line in lines if line.startswith("data: ")]
        assert len(first) + sum('"content"' in line for line in rest) == 480  # one chunk per token
        assert '"finish_reason":"length"' in rest[-2] and rest[-1] == "data: [DONE]"
        waiter.join(timeout=60)
        assert waiting_reply["r"].status_code == 200, waiting_reply["r"].text
        assert waiting_reply["r"].json()["usage"]["completion_tokens"] == 480
        assert process.proc.wait(timeout=60) == 0, "".join(process.log)
    finally:
        process.stop()


def test_request_timeout_cancels_and_says_so():
    """In process (FastAPI's TestClient runs the app's startup and shutdown): --request-timeout's 408."""
    import torch
    from fastapi.testclient import TestClient

    import idefics
    from idefics.serving import Engine, EngineConfig
    from idefics.serving.app import ServerConfig, create_app

    model = idefics.IdeficsForVisionText2Text.from_pretrained(idefics.DEMO_MODEL, dtype=torch.float32, device="cpu")
    processor = idefics.IdeficsProcessor.from_pretrained(idefics.DEMO_MODEL)
    engine = Engine(model, processor, EngineConfig(max_batch_size=1))
    app = create_app(engine, config=ServerConfig(served_model_names=["demo"], request_timeout=0.05))
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json=LONG)
        assert reply.status_code == 408 and "longer than 0.05 s" in reply.json()["error"]["message"]
        events = [line for line in client.post("/v1/chat/completions", json={**LONG, "stream": True}).text.splitlines()
                  if line]  # fmt: skip
        assert '"type":"timeout_error"' in events[-2] and events[-1] == "data: [DONE]"
        deadline = time.monotonic() + 30  # the engine thread applies a cancellation at its next step
        while engine.stats()["finished_total"]["cancelled"] < 2 or engine.stats()["slots_used"]:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)
