"""ChunkCoalescer and coalesced(): a sample's tokens leave at most once per interval, none is lost,
the first and the finishing chunk never wait, and a closed stream closes its source."""

from __future__ import annotations

import asyncio

import pytest

from worker_common.chunk_coalescer import ChunkCoalescer, coalesced, merged
from worker_common.messages import Ack, TokenChunk, TokenLogprob, WorkerError, ErrorReason


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chunk(tok: int, index: int = 0, finished: bool = False) -> TokenChunk:
    return TokenChunk((tok,), f"<{tok}>", finished, "length" if finished else None, index=index)


def test_interval_zero_passes_every_chunk():
    hold = ChunkCoalescer(0.0, Clock())
    assert [hold.add(chunk(t)) for t in range(3)] == [[chunk(0)], [chunk(1)], [chunk(2)]]
    assert hold.due_in() is None


def test_first_goes_at_once_then_merged_per_interval_and_the_last_at_once():
    clock = Clock()
    hold = ChunkCoalescer(0.05, clock)
    assert hold.add(chunk(1)) == [chunk(1)]  # first: TTFT untouched
    clock.now += 0.01
    assert hold.add(chunk(2)) == []
    clock.now += 0.01
    assert hold.add(chunk(3)) == []
    assert hold.due_in() == pytest.approx(0.03)
    clock.now += 0.03
    sent = hold.add(chunk(4))
    assert sent == [TokenChunk((2, 3, 4), "<2><3><4>")]
    clock.now += 0.001
    assert hold.add(chunk(5)) == []
    last = hold.add(chunk(6, finished=True))  # finishing: at once, with what was held
    assert last == [TokenChunk((5, 6), "<5><6>", True, "length")]
    assert hold.due_in() is None and hold.flush() == []


def test_samples_are_paced_apart_and_take_due_releases_a_silent_one():
    clock = Clock()
    hold = ChunkCoalescer(0.05, clock)
    assert hold.add(chunk(1, index=0)) == [chunk(1, index=0)]
    clock.now += 0.02
    assert hold.add(chunk(10, index=1)) == [chunk(10, index=1)]  # sample 1's first
    assert hold.add(chunk(2, index=0)) == []
    assert hold.add(chunk(11, index=1)) == []
    assert hold.take_due() == []
    clock.now += 0.031  # sample 0's interval is up, sample 1's is not
    assert hold.take_due() == [chunk(2, index=0)]
    assert hold.due_in() == pytest.approx(0.019)
    assert hold.flush() == [chunk(11, index=1)]


def test_merged_keeps_logprobs_in_order():
    a = TokenChunk((1,), "a", logprobs=(TokenLogprob(1, -0.5, ()),))
    b = TokenChunk((2,), "b", True, "stop", logprobs=(TokenLogprob(2, -0.25, ()),))
    assert merged(a, b) == TokenChunk((1, 2), "ab", True, "stop", (TokenLogprob(1, -0.5, ()), TokenLogprob(2, -0.25, ())))


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="interval_s"):
        ChunkCoalescer(-1.0)


async def _source(events, gaps, closed):
    try:
        for ev, gap in zip(events, gaps):
            await asyncio.sleep(gap)
            yield ev
    finally:
        closed.append(True)


async def _collect(stream):
    return [ev async for ev in stream]


def test_coalesced_stream_loses_nothing_and_sends_fewer_chunks():
    ack = Ack(0.0, 0.0, 0, None, None, 0)
    events = [ack] + [chunk(t) for t in range(20)] + [chunk(20, finished=True)]
    closed: list[bool] = []
    out = asyncio.run(_collect(coalesced(_source(events, [0.0] + [0.005] * 21, closed), 0.03)))
    assert out[0] == ack and out[1] == chunk(0)
    chunks = out[1:]
    assert [t for c in chunks for t in c.token_ids] == list(range(21))
    assert "".join(c.text for c in chunks) == "".join(f"<{t}>" for t in range(21))
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert len(chunks) < 12  # 21 tokens 5 ms apart in 30 ms chunks
    assert closed == [True]


def test_a_held_chunk_leaves_when_its_interval_is_up_though_the_source_is_silent():
    events = [chunk(1), chunk(2), chunk(3, finished=True)]
    seen: list[tuple[float, TokenChunk]] = []

    async def run():
        t0 = asyncio.get_running_loop().time()
        closed: list[bool] = []
        async for ev in coalesced(_source(events, [0.0, 0.001, 0.3], closed), 0.02):
            seen.append((asyncio.get_running_loop().time() - t0, ev))

    asyncio.run(run())
    assert [ev for _, ev in seen] == events
    assert seen[1][0] < 0.2  # chunk 2 left on its timer, long before the source's next event


def test_an_error_event_flushes_the_held_tokens_first():
    err = WorkerError(ErrorReason.REQUEST_FAILED, "boom")
    closed: list[bool] = []
    out = asyncio.run(_collect(coalesced(_source([chunk(1), chunk(2), err], [0, 0, 0], closed), 10.0)))
    assert out == [chunk(1), chunk(2), err]


def test_closing_the_stream_mid_wait_closes_the_source():
    closed: list[bool] = []

    async def run():
        stream = coalesced(_source([chunk(1), chunk(2), chunk(3)], [0.0, 0.0, 5.0], closed), 0.05)
        assert await anext(stream) == chunk(1)
        assert await anext(stream) == chunk(2)  # held, then sent on its timer while chunk 3 is awaited
        await stream.aclose()

    asyncio.run(asyncio.wait_for(run(), 2.0))
    assert closed == [True]
