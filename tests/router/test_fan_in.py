"""``fan_in``: several async streams as one (plain asyncio, no Ray)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from router.fan_in import fan_in


def run(coro):
    return asyncio.run(coro)


async def ticker(name: str, n: int, delay: float, closed: list[str], fail_at: int | None = None):
    try:
        for i in range(n):
            await asyncio.sleep(delay)
            if i == fail_at:
                raise RuntimeError(f"{name} failed")
            yield f"{name}{i}"
    finally:
        closed.append(name)


def test_every_item_comes_with_its_key_in_arrival_order():
    closed: list[str] = []

    async def go():
        return [kv async for kv in fan_in({"a": ticker("a", 3, 0.01, closed), "b": ticker("b", 2, 0.015, closed)})]

    got = run(go())
    assert sorted(got) == [("a", "a0"), ("a", "a1"), ("a", "a2"), ("b", "b0"), ("b", "b1")]
    assert [v for k, v in got if k == "a"] == ["a0", "a1", "a2"]  # each stream's own order kept
    assert sorted(closed) == ["a", "b"]


def test_the_first_failure_ends_it_and_closes_the_other_streams():
    closed: list[str] = []

    async def go():
        got = []
        with pytest.raises(RuntimeError, match="b failed"):
            async for kv in fan_in({"a": ticker("a", 100, 0.01, closed), "b": ticker("b", 5, 0.01, closed, 1)}):
                got.append(kv)
        return got

    run(go())
    assert sorted(closed) == ["a", "b"]


def test_a_consumer_that_leaves_or_is_cancelled_closes_every_stream():
    closed: list[str] = []

    async def leave():
        async with aclosing(fan_in({"a": ticker("a", 100, 0.01, closed), "b": ticker("b", 100, 0.01, closed)})) as s:
            async for _ in s:
                break

    run(leave())
    assert sorted(closed) == ["a", "b"]
    closed.clear()

    async def cancelled():
        async def consume():
            async for _ in fan_in({"a": ticker("a", 100, 0.01, closed), "b": ticker("b", 100, 0.01, closed)}):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancelled())
    assert sorted(closed) == ["a", "b"]
