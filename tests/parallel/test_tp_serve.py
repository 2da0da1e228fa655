"""`idefics serve --tensor-parallel-size 2` (two gloo ranks on CPU) answers the official `openai` client exactly as
one process does, and SIGTERM drains it and leaves no process behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))
from server_process import BLUE_TRIANGLE, RED_CIRCLE, ServerProcess, ask  # noqa: E402

QUESTIONS = [("What color is the shape?", RED_CIRCLE), ("Describe the image.", BLUE_TRIANGLE),
             ("What shape is this?", RED_CIRCLE), ("What color is the shape?", BLUE_TRIANGLE)]  # fmt: skip


def children(pid: int) -> set[int]:
    """Every descendant process of `pid` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def answers(server: ServerProcess) -> list:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    out = []
    for question, image in QUESTIONS:
        reply = client.chat.completions.create(model="idefics-demo", messages=ask(question, image), temperature=0,
                                               logprobs=True, top_logprobs=2)  # fmt: skip
        choice = reply.choices[0]
        out.append((choice.message.content, choice.finish_reason, reply.usage.completion_tokens,
                    [round(t.logprob, 4) for t in choice.logprobs.content]))  # fmt: skip
    streamed = client.chat.completions.create(model="idefics-demo", messages=ask(*QUESTIONS[1][:1], BLUE_TRIANGLE),
                                              temperature=0, stream=True)  # fmt: skip
    out.append("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))
    sampled = client.chat.completions.create(model="idefics-demo", messages=ask("Describe the image."), seed=3,
                                             temperature=1.0, n=2, max_tokens=8)  # fmt: skip
    out.append([c.message.content for c in sampled.choices])
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process check reads /proc (Linux)")
def test_two_ranks_answer_as_one_process_and_sigterm_leaves_no_process():
    one = ServerProcess()
    try:
        expected = answers(one)
    finally:
        one.terminate()
        assert one.proc.wait(timeout=60) == 0, "".join(one.log)
    two = ServerProcess("--tensor-parallel-size", "2")
    try:
        ranks = children(two.proc.pid)
        assert ranks, "the server started no other rank"
        assert answers(two) == expected
    except BaseException:
        two.stop()
        raise
    two.terminate()
    assert two.proc.wait(timeout=60) == 0, "".join(two.log)
    two.wait_for(lambda: not [pid for pid in ranks if alive(pid)], what=f"the ranks {ranks} to exit", timeout=10)


def test_a_rank_that_dies_stops_the_server():
    two = ServerProcess("--tensor-parallel-size", "2")
    ranks = children(two.proc.pid)
    spawned = [pid for pid in ranks if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert spawned
    os.kill(spawned[0], 9)
    assert two.proc.wait(timeout=30) != 0
    two.wait_for(lambda: "rank 1 of 2 exited" in "".join(two.log), what="rank 0's error line", timeout=10)
    two.wait_for(lambda: not [pid for pid in ranks if alive(pid)], what=f"the ranks {ranks} to exit", timeout=10)
