"""The engine's stepping thread: it sleeps, rather than spins, while requests wait for blocks."""

from __future__ import annotations

import asyncio
import time

from engine.async_engine import AsyncEngine
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
