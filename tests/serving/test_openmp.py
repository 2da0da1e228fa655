"""The engine thread runs at full speed only if the thread that loaded the model hands back its idle OpenMP team
(serving/openmp.py): checked in a fresh process by counting the process's threads."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, torch
    from idefics.serving.openmp import release_openmp_team
    torch.set_num_threads(2)
    x = torch.randn(64, 1024)
    for _ in range(3):
        x @ x.T  # parallel work: this thread gets an OpenMP team (one extra thread for 2)
    before = len(os.listdir("/proc/self/task"))
    released = release_openmp_team()
    print(before, len(os.listdir("/proc/self/task")), released)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads are counted in /proc/self/task (Linux)")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: torch starts no OpenMP team to release")
def test_release_frees_the_calling_threads_team():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    before, after, released = int(out[0]), int(out[1]), out[2]
    assert released == "True" and after == before - 1, out
