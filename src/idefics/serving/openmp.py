"""Keeping the engine thread's CPU parallelism at full speed.

PyTorch's CPU kernels run their parallel parts on an OpenMP thread team, and GNU OpenMP (libgomp, which the Linux
wheels bundle) gives each thread that starts parallel work its own team, kept alive afterwards. Once the threads of
all teams outnumber the CPUs, libgomp stops letting idle team members spin (it throttles them to ~100 spins), so
every parallel region pays for waking its team. The engine runs the model on its own thread while the thread that
loaded the model (usually the main one) keeps an idle team: on the 2-core machines here that made each decode step
~20-25% slower than the same step on the main thread (22 -> 27 ms at batch 16 on the bench config; a oneDNN
matmul 0.35 -> 0.41 ms).

`release_openmp_team()` hands the calling thread's idle team back (OpenMP 5.0's `omp_pause_resource_all`); the thread
gets a new one if it starts parallel work again. It is a no-op where no OpenMP runtime with that call is loaded.
"""

from __future__ import annotations

import ctypes
import sys

OMP_PAUSE_SOFT = 1  # keep the runtime initialised; free the threads
RUNTIMES = ("libgomp", "libiomp", "libomp")


def _runtimes() -> list[ctypes.CDLL]:
    """The OpenMP runtimes loaded in this process that have omp_pause_resource_all (Linux: from /proc/self/maps).
    There can be several: torch's libgomp, and private copies that other wheels bundle (sentencepiece's, ...)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if any(name in line for name in RUNTIMES)}
    except OSError:
        return []
    found = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            found.append(lib)
    return found


def release_openmp_team() -> bool:
    """Free the calling thread's idle OpenMP team(s); True when some runtime did it."""
    return any([lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0 for lib in _runtimes()])
