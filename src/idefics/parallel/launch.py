"""Start the other ranks of a tensor-parallel group from this process (`idefics serve / eval
--tensor-parallel-size N`), as vLLM does: torch.multiprocessing spawns ranks 1..N-1 and this process becomes rank 0.

Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the code it runs
is the code that runs under torchrun. The spawned ranks ignore SIGINT and SIGTERM (rank 0 receives them, drains and
then tells them to stop) and are killed by the kernel if rank 0 dies (PR_SET_PDEATHSIG), so no process outlives it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.multiprocessing as mp

from .world import TensorParallelError, leave

PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, environment: dict[str, str], fn: Callable, args: tuple) -> None:
    os.environ.update(environment, RANK=str(rank), LOCAL_RANK=str(rank))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # Linux: die with rank 0
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(environment["IDEFICS_RANK0_PID"]):
        os._exit(1)  # rank 0 died before the death signal was armed
    fn(*args)
    leave()  # rank 0 leaves the group too once it is done


class Ranks:
    """The spawned ranks 1..N-1: `watch()` ends rank 0 if one of them dies before it is told to stop (its
    collectives would otherwise wait for the dead rank until they time out), `join()` waits for them."""

    def __init__(self, processes: list):
        self.processes = processes
        self._stopping = threading.Event()

    def watch(self, interval: float = 0.2) -> None:
        def run():
            while not self._stopping.wait(interval):
                for rank, process in enumerate(self.processes, start=1):
                    if process.exitcode is not None and not self._stopping.is_set():
                        print(f"idefics: rank {rank} of {len(self.processes) + 1} exited with code {process.exitcode}"
                              "; stopping every rank", file=sys.stderr, flush=True)  # fmt: skip
                        os._exit(1)  # the other ranks die with this process (PR_SET_PDEATHSIG)

        threading.Thread(target=run, name="idefics-rank-watch", daemon=True).start()

    def stopping(self) -> None:
        """Rank 0 is shutting down: the ranks' exits from now on are expected."""
        self._stopping.set()

    def join(self, timeout: float | None = None) -> list[int | None]:
        """Wait for every spawned rank; returns their exit codes (None for one still running after `timeout`)."""
        for process in self.processes:
            process.join(timeout)
        return [p.exitcode for p in self.processes]

    def kill(self) -> None:
        self._stopping.set()
        for process in self.processes:
            if process.is_alive():
                process.kill()
        self.join()


def spawn_ranks(size: int, fn: Callable, *args) -> Ranks:
    """Make this process rank 0 of a group of `size` on this machine and spawn ranks 1..size-1 running fn(*args)
    (a module-level function: the spawned interpreters import it). The caller then joins the group itself."""
    if size < 2:
        raise TensorParallelError(f"spawn_ranks needs a group of at least 2 processes, got {size}")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TensorParallelError("already one of several processes (torchrun): do not ask for a tensor-parallel size")
    environment = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(size),
                       IDEFICS_RANK0_PID=str(os.getpid()))  # fmt: skip
    os.environ.update(environment, RANK="0", LOCAL_RANK="0")
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_rank_main, args=(rank, environment, fn, args), name=f"idefics-rank{rank}", daemon=False)
        for rank in range(1, size)
    ]
    for process in processes:
        process.start()
    return Ranks(processes)


@contextmanager
def as_rank0(size: int, follower: Callable, *args, parallel: bool) -> Iterator[None]:
    """Run the body as rank 0: with `size` > 1 spawn ranks 1..size-1 running follower(*args) first (a rank that dies
    ends this process too). On success every rank leaves the group (when `parallel`: this process is in one, spawned
    or torchrun's) and the spawned ones are joined; on an error they are killed, since they cannot finish without
    this rank."""
    ranks = spawn_ranks(size, follower, *args) if size > 1 else None
    if ranks is not None:
        ranks.watch()
    try:
        yield
    except BaseException:
        if ranks is not None:
            ranks.kill()
        raise
    if ranks is not None:
        ranks.stopping()
    if parallel:
        leave()
    if ranks is not None:
        ranks.join()
