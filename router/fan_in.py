"""Several async streams read as one, in arrival order.

Used where one client request is served by several streams at once: the
samples of an ``n`` > 1 request resuming on their own after a failure
(``request_runner``), and the prompts of one OpenAI request (``openai_http``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import aclosing
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


async def fan_in(streams: dict[K, AsyncIterator[T]]) -> AsyncIterator[tuple[K, T]]:
    """``(key, item)`` for every item of every stream, as they come, until all have ended.

    The first stream that raises ends the fan-in with its exception. However the
    fan-in ends (all done, an exception, the consumer gone or cancelled), every stream
    still open is cancelled and closed before it returns, so each one's own cleanup
    (for a request: dropping it on its workers) has run.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(key: K, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream) as items:
                async for item in items:
                    queue.put_nowait((key, item))
            queue.put_nowait((key, done))
        except Exception as exc:
            queue.put_nowait((key, exc))

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(k, s)) for k, s in streams.items()]
    left = len(tasks)
    try:
        while left:
            key, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield key, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
