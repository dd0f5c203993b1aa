"""Run torch set-up work on a thread that ends with it.

libgomp gives every thread that starts a parallel region an OpenMP team of
its own and keeps that team until the thread exits. Once a process holds
more OpenMP threads than it has cores, every team stops spinning between
parallel regions and sleeps in the kernel instead, so each of the hundreds
of parallel regions of an engine step pays a wake-up (measured on 2 cores:
a bf16 ``add`` of 112 x 576 took 11 us with one team, 54 us with a second
team alive, idle). A worker's engine computes on its step thread
(:mod:`engine.async_engine`); loading the model on the worker's main thread
would leave that thread's team behind for good, so the load runs here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T], name: str = "passing") -> T:
    """Run ``fn()`` on a new thread, wait for it to end, and return its result (or raise its
    exception): any OpenMP team ``fn`` started ends with that thread."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]
