"""The engine's stepping thread: it runs every engine call between steps, and sleeps, rather than
spins, while requests wait for blocks."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.async_engine import AsyncEngine, EngineClosedError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def test_waiting_without_free_blocks_does_not_busy_spin(tiny_model):
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=8)
    calls = {"schedule": 0}
    schedule = engine.scheduler.schedule

    def counted():
        calls["schedule"] += 1
        return schedule()

    engine.scheduler.schedule = counted
    runner = AsyncEngine(engine)

    async def go() -> list[int]:
        assert await runner.call(lambda e: e.reserve("hog", 8 * 4))  # every block held by a reservation
        outs: list[int] = []

        async def consume() -> None:
            async for out in runner.stream("waiter", lambda e: e.add_request(
                    "waiter", params=SamplingParams(max_tokens=3, ignore_eos=True), prompt_token_ids=[1, 2, 3])):
                outs.extend(out.new_token_ids)

        task = asyncio.get_running_loop().create_task(consume())
        await asyncio.sleep(0.3)  # the waiter is queued by now
        before, t0 = calls["schedule"], time.monotonic()
        await asyncio.sleep(1.0)
        polls_per_s = (calls["schedule"] - before) / (time.monotonic() - t0)
        # Spinning would schedule thousands of times a second; sleeping between looks, ~20.
        assert polls_per_s < 100, polls_per_s
        await runner.call(lambda e: e.cancel_reservation("hog"))  # blocks free: the waiter runs at once
        await asyncio.wait_for(task, timeout=30)
        return outs

    try:
        assert len(asyncio.run(go())) == 3
    finally:
        runner.close()


def test_a_parked_kv_is_exported_before_the_next_step_runs(tiny_model):
    """The step that parks a prompt's KV is followed by its caller's export, not by the
    next prompt's prefill (which may be long): the hand-off never waits out another step."""
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=256)
    runner = AsyncEngine(engine, handoff_wait_s=30.0)  # generous: the assertion is about order, not speed
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def start(e: LLMEngine):
        e.add_request("short", params=params, prompt_token_ids=list(range(1, 9)), export_after_prefill=True)
        e.add_request("long", params=params, prompt_token_ids=[i % 200 + 1 for i in range(400)])  # the next step's

    async def go() -> tuple[int, int]:
        outs = [out async for out in runner.stream("short", start)]
        assert outs[-1].kv_ready
        steps, handoff = await runner.call(lambda e: (e.num_steps, e.export_kv("short")))
        assert handoff.num_tokens == 8
        await runner.call(lambda e: (e.release("short"), e.abort_request("long")))
        return steps, engine.num_steps

    try:
        steps_at_export, _ = asyncio.run(go())
        assert steps_at_export == 1, "the long prompt's step ran before the parked KV was exported"
    finally:
        runner.close()


def test_every_engine_call_runs_on_the_step_thread(tiny_model):
    """Steps and calls share one thread: the process keeps one OpenMP team (see engine.async_engine)."""
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=64)
    runner = AsyncEngine(engine)
    step_threads: set[int] = set()
    step = engine.step

    def recorded_step():
        step_threads.add(threading.get_ident())
        return step()

    engine.step = recorded_step

    async def go() -> set[int]:
        call_threads = {await runner.call(lambda e: threading.get_ident())}
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        outs = [o async for o in runner.stream("r", lambda e: (call_threads.add(threading.get_ident()),
                                                               e.add_request("r", params=params,
                                                                             prompt_token_ids=[1, 2, 3])))]
        assert outs[-1].finished
        return call_threads

    try:
        call_threads = asyncio.run(go())
        assert step_threads and call_threads == step_threads == {runner._thread.ident}
        assert runner._thread.ident != threading.get_ident()
    finally:
        runner.close()


def test_a_failing_call_reaches_its_caller_and_the_thread_goes_on(tiny_model):
    runner = AsyncEngine(LLMEngine(tiny_model, block_size=4, num_blocks=16))

    def boom(e: LLMEngine) -> None:
        raise ValueError("bad call")

    async def go() -> int:
        with pytest.raises(ValueError, match="bad call"):
            await runner.call(boom)
        return await runner.call(lambda e: e.kv.block_size)

    try:
        assert asyncio.run(go()) == 4
    finally:
        runner.close()


def test_a_call_cancelled_before_it_starts_does_not_run(tiny_model):
    """A caller that gives up (its task cancelled) while an earlier call still runs leaves nothing behind."""
    runner = AsyncEngine(LLMEngine(tiny_model, block_size=4, num_blocks=16))
    ran: list[str] = []
    release = threading.Event()

    async def go() -> None:
        loop = asyncio.get_running_loop()
        first = loop.create_task(runner.call(lambda e: (release.wait(10), ran.append("first"))))
        await asyncio.sleep(0.1)  # the step thread is inside the first call
        second = loop.create_task(runner.call(lambda e: ran.append("second")))
        await asyncio.sleep(0.1)
        second.cancel()
        await asyncio.sleep(0.1)  # the cancellation reaches the queued call
        release.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await second
        await runner.call(lambda e: None)  # the queue has been worked past the cancelled call

    try:
        asyncio.run(go())
        assert ran == ["first"]
    finally:
        runner.close()


def test_calls_after_close_are_refused(tiny_model):
    runner = AsyncEngine(LLMEngine(tiny_model, block_size=4, num_blocks=16))

    async def go() -> None:
        assert await runner.call(lambda e: 1) == 1
        runner.close()
        with pytest.raises(EngineClosedError):
            await asyncio.wait_for(runner.call(lambda e: 2), timeout=10)

    asyncio.run(go())
    assert not runner._thread.is_alive()
