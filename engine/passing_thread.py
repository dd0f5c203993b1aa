"""Run torch set-up work on a thread that ends with it.

A thread that runs a parallel torch op keeps an OpenMP team until it exits,
and a second team in a process slows every engine step (measured in
:mod:`engine.async_engine`, whose step thread is meant to hold the only one).
A worker loading its model on its own long-lived thread would leave such a
team behind for good, so the load runs here.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T], name: str = "passing") -> T:
    """Run ``fn()`` on a new thread, wait for it to end, and return its result (or raise its
    exception): any OpenMP team ``fn`` started ends with that thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as pool:  # exit joins the thread
        return pool.submit(fn).result()
