"""A request with ``n`` samples through real workers in this process (no Ray), on
builtin:tiny-llama: one prefill on the prefill worker (n first tokens), one KV push,
one import on the decode worker that forks the samples over shared blocks (the
reservation counts them once plus n tails); the colocated ``serve`` prefills once
and forks. Every sample equals a lone request with its seed; a stream closed early
frees every sample's blocks; nothing is held after any ending."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from analysis.model_catalog import TINY_MODEL
from engine.kv_cache_manager import blocks_needed
from engine.sampling_params import SamplingParams
from tests.local_workers import make_workers
from worker_common.messages import Ack, KVPushed, PrefillResult, TokenChunk

NUM_BLOCKS = 64
BLOCK = 16  # the engines' default block size
PROMPT = [ord(c) for c in "tell me about paged attention, and about copy on write"]  # 54 tokens: a partial last block
PARAMS = SamplingParams(max_tokens=8, temperature=1.0, seed=31, ignore_eos=True)
N = 3


@pytest.fixture(scope="module")
def workers():
    made = make_workers(TINY_MODEL, NUM_BLOCKS)
    loop = asyncio.new_event_loop()  # one loop for the module: an engine's streams belong to the first loop it ran on
    yield made, loop.run_until_complete
    for w in made:
        w.shutdown()
    loop.run_until_complete(asyncio.sleep(0.01))  # let the cancelled lease reapers finish
    loop.close()


def by_sample(events) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for ev in events:
        if isinstance(ev, TokenChunk):
            out.setdefault(ev.index, []).extend(ev.token_ids)
    return out


async def lone(worker, rid: str, seed: int) -> list[int]:
    return by_sample([ev async for ev in worker.serve(rid, PROMPT, replace(PARAMS, seed=seed))])[0]


def test_disaggregated_samples_prefill_once_push_once_and_equal_lone_requests(workers):
    (prefill, decode, colocated), run = workers

    async def go():
        reserved = await decode.reserve("g1", len(PROMPT), prefill.endpoint(), token_ids=PROMPT, n=N)
        held = decode.status().used_blocks
        result = await prefill.prefill("g1", PROMPT, PARAMS, reserved.endpoint, n=N)
        assert isinstance(result, PrefillResult) and isinstance(result.push, KVPushed), result
        assert [c.index for c in result.firsts] == list(range(N))
        events = [ev async for ev in decode.generate("g1", result.push.handoff, PARAMS, 30.0, "")]
        assert await prefill.release("g1")
        got = by_sample(events)
        for c in result.firsts:
            got[c.index] = list(c.token_ids) + got.get(c.index, [])
        want = [await lone(colocated, f"lone{i}", PARAMS.seed + i) for i in range(N)]
        return held, result, events, got, want

    held, result, events, got, want = run(go())
    assert held == blocks_needed(len(PROMPT) + 1, BLOCK) + (N - 1)  # the prompt once, plus a tail per other sample
    assert isinstance(events[0], Ack) and len(result.push.handoff.samples) == N
    assert [got[i] for i in range(N)] == want
    assert prefill.status().prefills == 1 and decode.status().kv_imports == 1 and decode.status().forks == N - 1
    for w in (prefill, decode):
        s = w.status()
        assert (s.free_blocks, s.held, s.reserved, s.running, s.outstanding_tokens) == (NUM_BLOCKS, 0, 0, 0, 0), s


def test_colocated_samples_and_an_early_close_frees_every_sample(workers):
    (_, _, colocated), run = workers
    forks_before = colocated.status().forks

    async def go():
        events = [ev async for ev in colocated.serve("c1", PROMPT, PARAMS, n=N)]
        stream = colocated.serve("c2", PROMPT, PARAMS, n=N)
        seen = 0
        async for ev in stream:
            seen += isinstance(ev, TokenChunk)
            if seen == N + 1:  # every sample's first token, and one more
                break
        await stream.aclose()  # the blocks of every sample are free when this returns
        s = colocated.status()
        assert (s.free_blocks, s.running) == (NUM_BLOCKS, 0), s
        return events

    events = run(go())
    got = by_sample(events)
    want = run(_lones(colocated))
    assert [got[i] for i in range(N)] == want
    assert colocated.status().forks - forks_before == 2 * (N - 1)
    s = colocated.status()
    assert (s.free_blocks, s.running, s.waiting, s.outstanding_tokens) == (NUM_BLOCKS, 0, 0, 0), s


async def _lones(worker) -> list[list[int]]:
    return [await lone(worker, f"c-lone{i}", PARAMS.seed + i) for i in range(N)]
