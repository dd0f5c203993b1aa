"""A request the engine fails on its own becomes a ``REQUEST_FAILED``
WorkerError carrying the engine's message, on the prefill and the decode side;
the requests beside it finish, and the worker keeps no block of it.

Real workers in this process, on a checkpoint whose logits for one token are
NaN (tests/faulty_model.py): sampled requests cannot be sampled there, greedy
ones always pick the poisoned token. Nothing is patched."""

from __future__ import annotations

import asyncio

import pytest

from engine.sampling_params import SamplingParams
from kvtransfer.endpoints import InProcEndpoint
from tests.faulty_model import write_nan_logit_model
from tests.local_workers import make_workers
from worker_common.messages import Ack, ErrorReason, PrefillResult, TokenChunk, WorkerError

NUM_BLOCKS = 32
PROMPT = [ord(c) for c in "tell me about paged attention"]  # ids below 256: byte tokens of the tiny tokenizer
SAMPLED = SamplingParams(max_tokens=4, temperature=0.7, seed=1, ignore_eos=True)


@pytest.fixture
def nan_workers(tmp_path):
    name, token = write_nan_logit_model(tmp_path / "nan-logit")
    made = make_workers(name, NUM_BLOCKS)
    yield made, token
    for w in made:
        w.shutdown()


def assert_request_failed(error) -> None:
    assert isinstance(error, WorkerError) and error.reason is ErrorReason.REQUEST_FAILED, error
    assert "sampling failed" in error.detail and not error.kv_held


def test_prefill_worker_turns_a_failed_request_into_request_failed(nan_workers):
    (prefill, _, _), token = nan_workers
    first_only = SamplingParams(max_tokens=1)  # finishes with its first token: no KV to push
    nobody = InProcEndpoint(worker_id="no-decode")  # never reached: no request here pushes KV

    async def go():
        return await asyncio.gather(
            prefill.prefill("bad", PROMPT, SAMPLED, decode_endpoint=nobody),
            *(prefill.prefill(f"ok{i}", PROMPT[i:], first_only, decode_endpoint=nobody) for i in range(3)))

    bad, *oks = asyncio.run(go())
    assert_request_failed(bad)
    for ok in oks:
        assert isinstance(ok, PrefillResult) and ok.push is None, ok
        assert ok.first.token_ids == (token,) and ok.first.finish_reason == "length"
    s = prefill.status()
    assert (s.free_blocks, s.held, s.outstanding_tokens, s.requests_served) == (NUM_BLOCKS, 0, 0, 3)


@pytest.mark.parametrize("kind", ["decode", "colocated"])
def test_decode_stream_ends_with_request_failed_and_the_batch_goes_on(nan_workers, kind):
    (_, decode, colocated), token = nan_workers
    worker = decode if kind == "decode" else colocated
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)

    async def events(request_id, params, prompt):
        return [ev async for ev in worker.serve(request_id, prompt, params)]

    async def go():
        return await asyncio.gather(events("bad", SAMPLED, PROMPT),
                                    *(events(f"ok{i}", greedy, PROMPT[i:]) for i in range(2)))

    bad, *oks = asyncio.run(go())
    assert not [ev for ev in bad if isinstance(ev, TokenChunk)], bad
    assert_request_failed(bad[-1])
    for evs in oks:
        assert isinstance(evs[0], Ack), evs
        chunks = evs[1:]
        assert all(isinstance(ev, TokenChunk) for ev in chunks), evs
        assert [t for ev in chunks for t in ev.token_ids] == [token] * 6 and chunks[-1].finish_reason == "length"
    s = worker.status()
    assert (s.free_blocks, s.running, s.waiting, s.outstanding_tokens) == (NUM_BLOCKS, 0, 0, 0)
