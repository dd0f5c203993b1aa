"""Merge a request's per-step token chunks so that each sample's tokens leave at most
every ``interval_s`` (``decode.stream_interval_ms``).

Why: every chunk a decode worker yields is one item of a Ray streaming call, one
awaited object in the router and one gRPC message to the client; on a small
machine that per-item work competes with the decode step itself for the cores.
With 8 streams and a 10-15 ms step, merging a sample's tokens into one chunk per
interval cuts that work by the number of steps per interval. What it costs is
burstier delivery: the mean time per output token does not change (a finishing
chunk leaves at once), but a token may wait up to one interval (plus a step) for
its chunk. ``vLLM`` and ``SGLang`` offer the same trade as ``stream_interval`` in
tokens; it is in time here so that it means the same at any step length.

The first chunk of each sample and every finishing chunk leave at once (TTFT and
end-to-end latency are untouched); interval 0 passes every chunk through.
Torch-free and clock-injected, so it is unit-tested as plain Python.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TypeVar

from worker_common.messages import TokenChunk

E = TypeVar("E")


def merged(first: TokenChunk, later: TokenChunk) -> TokenChunk:
    """``first`` then ``later`` (one sample's consecutive chunks) as one chunk."""
    return replace(later, token_ids=first.token_ids + later.token_ids, text=first.text + later.text,
                   logprobs=first.logprobs + later.logprobs)


class ChunkCoalescer:
    """Holds back one request's chunks, per sample, until they may leave.

    ``add`` takes each chunk as the engine makes it and returns those to send now;
    ``due_in`` says how long until a held chunk is due (``None``: nothing held), so
    the caller can wake for it even if no further chunk comes (a preempted
    request); ``take_due`` returns what is due by then; ``flush`` returns all.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._held: dict[int, TokenChunk] = {}  # sample index -> tokens not yet sent
        self._sent_at: dict[int, float] = {}  # sample index -> when its last chunk left

    def add(self, chunk: TokenChunk) -> list[TokenChunk]:
        """Record ``chunk``; the chunks to send now (in order), possibly none."""
        i = chunk.index
        held = self._held.pop(i, None)
        chunk = merged(held, chunk) if held is not None else chunk
        now = self._clock()
        last = self._sent_at.get(i)
        if chunk.finished or last is None or now - last >= self.interval_s:
            self._sent_at[i] = now
            return [chunk]
        self._held[i] = chunk
        return []

    def due_in(self) -> float | None:
        """Seconds until the earliest held chunk may leave (0 if it may now); ``None`` if none is held."""
        if not self._held:
            return None
        now = self._clock()
        return max(0.0, min(self._sent_at[i] + self.interval_s - now for i in self._held))

    def take_due(self) -> list[TokenChunk]:
        """The held chunks whose interval has passed, removed from the hold."""
        now = self._clock()
        due = [i for i in self._held if now - self._sent_at[i] >= self.interval_s]
        for i in due:
            self._sent_at[i] = now
        return [self._held.pop(i) for i in due]

    def flush(self) -> list[TokenChunk]:
        """Every held chunk, now (the stream is ending)."""
        out = list(self._held.values())
        self._held.clear()
        return out


def coalesced(events: AsyncIterator[E], interval_s: float) -> AsyncIterator[E]:
    """``events`` (one request's stream) with its :class:`TokenChunk` s merged by a
    :class:`ChunkCoalescer` of ``interval_s``; any other event passes at once, after
    the chunks held before it. A held chunk leaves when its interval is up even if
    ``events`` is silent meanwhile. Closing this stream closes ``events``.
    Interval 0: ``events`` itself (no extra hop per event)."""
    if interval_s <= 0:
        return events
    return _coalesced(events, interval_s)


async def _coalesced(events: AsyncIterator[E], interval_s: float) -> AsyncIterator[E]:
    hold = ChunkCoalescer(interval_s)
    pending: asyncio.Future | None = None  # the next event being awaited, kept across a timed-out wait
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            wait = hold.due_in()
            if wait is not None and not pending.done():
                await asyncio.wait({pending}, timeout=wait)
                if not pending.done():
                    for chunk in hold.take_due():
                        yield chunk
                    continue
            next_event, pending = pending, None
            try:
                ev = await next_event
            except StopAsyncIteration:
                break
            if isinstance(ev, TokenChunk):
                for chunk in hold.add(ev):
                    yield chunk
            else:
                for chunk in hold.flush():
                    yield chunk
                yield ev
        for chunk in hold.flush():
            yield chunk
    finally:
        if pending is not None:  # closed while the next event was awaited: stop that wait first
            pending.cancel()
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved: it is not logged as unhandled
        await events.aclose()
