"""in_passing_thread: torch work done there leaves no OpenMP thread behind (why: engine.passing_thread)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.passing_thread import in_passing_thread

# Counts this process's OS threads before and after a parallel torch op run on a passing
# thread, then on the main thread (the control: there the OpenMP team stays).
_PROBE = textwrap.dedent("""
    import os, time, torch
    from engine.passing_thread import in_passing_thread
    torch.set_num_threads(2)
    def threads():
        return len(os.listdir("/proc/self/task"))
    def work():
        x = torch.ones(1 << 22)
        x.add_(1)
        return float(x[0])
    before = threads()
    assert in_passing_thread(work) == 2.0
    # The team's threads are told to exit when their master does; they leave a moment later.
    deadline = time.monotonic() + 10
    while threads() != before and time.monotonic() < deadline:
        time.sleep(0.02)
    after_passing = threads()
    work()
    after_main = threads()
    print(before, after_passing, after_main)
""")


def test_an_openmp_team_started_on_a_passing_thread_ends_with_it():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    before, after_passing, after_main = map(int, out.stdout.split())
    assert after_passing == before, "the passing thread's OpenMP team outlived it"
    assert after_main > before, "control: a team started on the main thread stays (else this test proves nothing)"


def test_results_and_exceptions_come_back():
    assert in_passing_thread(lambda: 41 + 1) == 42
    with pytest.raises(KeyError, match="gone"):
        in_passing_thread(lambda: {}["gone"])
