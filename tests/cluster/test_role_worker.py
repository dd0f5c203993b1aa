"""RoleWorker in this process (no Ray): it serves as a prefill worker through a real KV hand-off,
refuses to switch while it holds work, switches to decode keeping the very same loaded weights,
and then decodes the same tokens as a plain DecodeWorker."""

from __future__ import annotations

import asyncio

import pytest

from cluster.role_worker import FORWARDED, RoleSwitchError, RoleWorker, WrongRoleError
from decode_worker.worker import DecodeWorker
from engine.model_loader import TINY_MODEL
from engine.sampling_params import SamplingParams
from tests.local_workers import LOOPBACK
from worker_common.messages import KVPushed, PrefillResult, TokenChunk
from worker_common.worker_config import DecodeEngineConfig, ModelConfig, PrefillEngineConfig

BLOCKS = 32
PROMPT = [ord(c) for c in "switch roles in place"]
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def tokens(events) -> list[int]:
    return [t for ev in events if isinstance(ev, TokenChunk) for t in ev.token_ids]


@pytest.fixture(scope="module")
def pair():
    mc = ModelConfig(name=TINY_MODEL)
    engines = {"prefill": PrefillEngineConfig(num_blocks=BLOCKS), "decode": DecodeEngineConfig(num_blocks=BLOCKS)}
    rw = RoleWorker("r0", role="prefill", model=mc, engines=engines, handoff=LOOPBACK)
    decode = DecodeWorker("d0", model=mc, engine=engines["decode"], handoff=LOOPBACK)
    yield rw, decode
    rw.shutdown()
    decode.shutdown()


def test_every_call_of_either_kind_is_forwarded():
    for name in ("prefill", "resend", "release", "reserve", "rearm", "generate", "serve", "abort", "status", "ping",
                 "endpoint", "kvtransfer_deliver"):
        assert name in FORWARDED


def test_prefill_role_then_switch_to_decode_keeping_the_weights(pair):
    asyncio.run(prefill_then_switch(*pair))  # one event loop: the engines' streams belong to it


async def prefill_then_switch(rw: RoleWorker, decode: DecodeWorker) -> None:
    async def handoff(tid: str) -> PrefillResult:
        endpoint = (await decode.reserve(tid, len(PROMPT), rw.endpoint())).endpoint
        result = await rw.prefill(tid, PROMPT, GREEDY, endpoint)
        assert isinstance(result, PrefillResult) and isinstance(result.push, KVPushed), result
        return result

    async def served(worker, rid):
        return tokens([ev async for ev in worker.serve(rid, PROMPT, GREEDY)])

    result = await handoff("t1")
    events = [ev async for ev in decode.generate("t1", result.push.handoff, GREEDY, 30.0, result.first.text)]
    assert await rw.release("t1")
    reference = await served(decode, "ref")
    assert list(result.first.token_ids) + tokens(events) == reference and len(reference) == 6
    assert rw.status().kind == "prefill" and rw.status().recent_latencies  # its part of TTFT was recorded

    # Not drained: pushed KV held until the decode side acknowledges is work it holds.
    weights, old_endpoint = rw._role.preloaded.model, rw.endpoint()
    await handoff("t2")
    assert rw.status().held == 1
    with pytest.raises(RoleSwitchError, match="not drained"):
        rw.switch_role("decode")
    await rw.abort("t2")
    await decode.abort("t2")

    seconds = rw.switch_role("decode")
    assert seconds > 0 and rw.role() == "decode" and rw.switches == 1
    assert rw._role.preloaded.model is weights  # the same weights object: nothing was loaded again
    s = rw.status()
    assert (s.kind, s.num_blocks, s.free_blocks, s.requests_served) == ("decode", BLOCKS, BLOCKS, 0)
    assert rw.endpoint() != old_endpoint  # a new transport: the pool manager re-reads it
    assert await served(rw, "after") == reference
    assert rw.status().recent_latencies  # now TPOT samples
    with pytest.raises(WrongRoleError, match="serves decode now"):
        await rw.prefill("t3", PROMPT, GREEDY, {})
    assert rw.switch_role("decode") == 0.0  # already that role
    with pytest.raises(RoleSwitchError, match="unknown role"):
        rw.switch_role("colocated")
