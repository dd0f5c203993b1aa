"""Awaiting with a timeout without losing a cancel.

On Python 3.11, ``asyncio.wait_for`` returns the awaited result instead of
raising ``CancelledError`` when that result arrives in the same turn of the
event loop as a cancel of the waiting task (CPython gh-86296; rewritten in
3.12). In the router that swallowed client disconnects: a token stream's next
chunk is nearly always ready, so about one cancel in three was lost and the
request decoded to its end, holding its KV on both workers. Project code
therefore bounds awaits with :func:`within` (``asyncio.timeout``, whose cancel
always wins); tests/worker_common/test_timeouts.py shows both behaviours and
checks that no module uses ``wait_for``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """``await awaitable``, raising :class:`TimeoutError` after ``timeout_s`` seconds
    (``None``: no bound). A cancel of the caller always propagates, even when the
    awaited result is already there."""
    async with asyncio.timeout(timeout_s):
        return await awaitable
