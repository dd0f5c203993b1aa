"""``RayHead.stop`` on stand-in process groups (no Ray): a group that ignores SIGTERM is killed after the
grace, a head found again by its pid (not our child) counts as stopped once it is a zombie."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from cluster.local_ray import RayHead, pid_running

# A leader that ignores SIGTERM (as `ray start --block` seems to while Ray's shutdown waits on its
# processes one by one) with a child that ignores it too.
STUBBORN_GROUP = "trap '' TERM; (trap '' TERM; sleep 300) & sleep 300"


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies waiting to be reaped do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path):
    proc = subprocess.Popen(["bash", "-c", STUBBORN_GROUP], start_new_session=True)
    time.sleep(0.3)  # the traps are set
    head = RayHead("127.0.0.1:1", "http://127.0.0.1:1", tmp_path / "log", proc.pid, proc)
    started = time.monotonic()
    head.stop(timeout_s=30, grace_s=1.0)
    took = time.monotonic() - started
    assert not head.alive() and not group_alive(proc.pid), "the group outlived stop()"
    assert 1.0 <= took < 10, took  # waited the grace, then killed


def test_a_head_that_is_not_our_child_counts_as_stopped_once_it_is_a_zombie(tmp_path: Path):
    # A child we do not reap stands for a head that an earlier command started: after it exits it stays a
    # zombie until reaped, and os.kill(pid, 0) still succeeds on it.
    proc = subprocess.Popen(["bash", "-c", STUBBORN_GROUP], start_new_session=True)
    time.sleep(0.3)
    head = RayHead("127.0.0.1:1", "http://127.0.0.1:1", tmp_path / "log", proc.pid)  # no Popen: by pid only
    assert pid_running(proc.pid) and head.alive()
    started = time.monotonic()
    head.stop(timeout_s=30, grace_s=1.0)
    assert time.monotonic() - started < 10
    os.kill(proc.pid, 0)  # still there, as a zombie ...
    assert not pid_running(proc.pid) and not head.alive()  # ... which is stopped
    proc.wait(timeout=5)
    assert not pid_running(proc.pid)
