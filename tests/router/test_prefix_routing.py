"""Prefix-aware routing and conditional disaggregation in the router: the
prefix index, the prefix_aware policy's cost, and which path an attempt
takes (scripted worker stand-ins; no Ray, no model)."""

from __future__ import annotations

import asyncio

import pytest

from engine.kv_cache_manager import chain_hashes
from engine.sampling_params import SamplingParams
from observability.stages import RequestPath
from router.policy import PrefixAware, WorkerLoad, make_policy
from router.prefix_index import PrefixIndex, PrefixQuery
from router.request_runner import ConditionalPrefill, RequestRunner, RequestTrace
from router.validation import ParsedRequest
from tests.router.test_request_runner import META, _Method, Directory, Scripted, decode_handle, prefilled, worker
from worker_common.messages import Ack, KVPushed, Reserved, TokenChunk
from engine.step_stats import StepStatsSnapshot
from worker_common.worker_status import KVTransferStats, WorkerStatus

KEY = "model|f32"
PROMPT = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 + 8


def publish(index: PrefixIndex, worker_id: str, tokens: list[int], block_size: int = 16) -> None:
    index.update(worker_id, True, block_size, KEY, tuple(chain_hashes(tokens, block_size, KEY)))


def test_index_counts_leading_published_blocks_per_block_size_and_key():
    index = PrefixIndex()
    publish(index, "a", PROMPT[:32])
    publish(index, "b", PROMPT[:32], block_size=8)
    index.update("c", True, 16, "another-format", tuple(chain_hashes(PROMPT, 16, "another-format")))
    index.update("d", False, 16, KEY, tuple(chain_hashes(PROMPT, 16, KEY)))  # caching off: nothing
    q = PrefixQuery(PROMPT)
    assert index.cached_tokens("a", q) == 32
    assert index.cached_tokens("b", q) == 32
    assert index.cached_tokens("c", PrefixQuery([0] + PROMPT[1:])) == 0  # the first block differs: no prefix
    assert index.cached_tokens("d", q) == 0 and index.cached_tokens("unknown", q) == 0
    # As the engine: the last token is always computed, so a 32-token prompt can hit 16 at most.
    assert index.cached_tokens("a", PrefixQuery(PROMPT[:32])) == 16
    index.forget("a")
    assert index.cached_tokens("a", q) == 0


def test_prefix_aware_weighs_cached_tokens_against_load():
    policy = PrefixAware(cache_weight=1.0)
    idle = WorkerLoad("idle", outstanding_tokens=0, free_blocks=10, num_blocks=10)
    warm = WorkerLoad("warm", outstanding_tokens=500, free_blocks=5, num_blocks=10, cached_tokens=1000)
    assert policy.rank([idle, warm]) == ["warm", "idle"]
    busy = WorkerLoad("warm", outstanding_tokens=1500, free_blocks=5, num_blocks=10, cached_tokens=1000)
    assert policy.rank([idle, busy]) == ["idle", "warm"]
    assert PrefixAware(cache_weight=0).rank([idle, warm]) == make_policy("least_loaded").rank([idle, warm])
    with pytest.raises(ValueError):
        make_policy("nearest")


def test_conditional_prefill_decides_on_the_uncached_part():
    off = ConditionalPrefill()
    assert not off.enabled and not off.decode_only(10, 0)
    short = ConditionalPrefill(max_uncached_tokens=64)
    assert short.decode_only(64, 0) and not short.decode_only(1000, 0) and short.decode_only(1000, 960)
    mostly = ConditionalPrefill(min_cached_ratio=0.75)
    assert mostly.decode_only(1000, 800) and not mostly.decode_only(1000, 700)


def test_conditional_prefill_offloads_a_short_prompt_only_from_a_busy_decode_to_an_idle_prefill():
    on = ConditionalPrefill(max_uncached_tokens=64, offload_when_prefill_idle=True)
    assert on.offload(0, decode_busy=True, prefill_cached_tokens=0)
    assert not on.offload(0, decode_busy=False, prefill_cached_tokens=0)  # nothing to stall
    assert not on.offload(0, decode_busy=True, prefill_cached_tokens=None)  # no prefill worker idle
    assert not on.offload(32, decode_busy=True, prefill_cached_tokens=16)  # it would recompute what decode caches
    assert on.offload(32, decode_busy=True, prefill_cached_tokens=32)
    assert not ConditionalPrefill(max_uncached_tokens=64).offload(0, decode_busy=True, prefill_cached_tokens=0)


def run(runner: RequestRunner) -> tuple[list[TokenChunk], RequestTrace]:
    req = ParsedRequest("req", PROMPT, SamplingParams(max_tokens=2))
    trace = RequestTrace()

    async def go():
        return [ev async for ev in runner.run(req, trace)]

    return asyncio.run(go()), trace


def test_a_prompt_the_decode_worker_mostly_caches_is_prefilled_there_and_nothing_moves():
    async def serve(*args):
        yield Ack(1.0, 1.1, 0, 1.05, 1.2, cached_tokens=32)
        yield TokenChunk((7, 8), "ab", True, "length")

    prefill = Scripted(prefill=lambda *a: pytest.fail("the prefill pool must not be used"))
    decode = Scripted(serve=serve)
    directory = Directory(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode))
    publish(directory.prefix_index, "decode-0", PROMPT)
    runner = RequestRunner(directory, make_policy("prefix_aware"), make_policy("prefix_aware"),
                           conditional=ConditionalPrefill(max_uncached_tokens=8))
    chunks, trace = run(runner)
    assert [c.token_ids for c in chunks] == [(7, 8)]
    assert trace.path is RequestPath.DECODE_ONLY and trace.decode_worker == "decode-0"
    assert trace.prefill_cached_tokens == 32 and trace.transfer_bytes == 0
    (args,) = decode.called("serve")
    assert args[1] == PROMPT
    assert not decode.called("reserve") and not prefill.calls


def test_a_long_uncached_part_is_disaggregated_and_only_the_missing_kv_moves():
    pushed = KVPushed(META, 8 * 100, 1.3, 1.4)  # 8 tokens sent, 100 bytes each
    prefill = Scripted(prefill=lambda *a: prefilled(pushed))
    decode = decode_handle(Ack(2.0, 2.1, 8), TokenChunk((8,), "b", True, "length"))
    decode.reserve.reply = lambda *a: Reserved({"reserved": True}, cached_tokens=32)
    directory = Directory(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode))
    runner = RequestRunner(directory, make_policy("prefix_aware"), make_policy("prefix_aware"),
                           conditional=ConditionalPrefill(max_uncached_tokens=4))
    _, trace = run(runner)
    assert trace.path is RequestPath.DISAGGREGATED
    (reserve_args,) = decode.called("reserve")
    assert reserve_args[1] == len(PROMPT) and reserve_args[4] == PROMPT  # the KV's token ids go with it
    (prefill_args,) = prefill.called("prefill")
    assert prefill_args[7] == 32  # the prefill worker pushes from token 32 on
    assert (trace.decode_cached_tokens, trace.transfer_bytes, trace.transfer_bytes_saved) == (32, 800, 3200)


def _status(worker_id: str, kind: str, running: int) -> WorkerStatus:
    return WorkerStatus(worker_id, kind, running=running, waiting=0, reserved=0, outstanding_tokens=0,
                        free_blocks=10, used_blocks=0, num_blocks=10, requests_served=0, preemptions=0,
                        step_stats=StepStatsSnapshot(), kv_transfer=KVTransferStats())


@pytest.mark.parametrize("decode_running,prefill_running,reserving,stale,path", [
    (0, 0, 0, False, RequestPath.DECODE_ONLY),      # decode idle: it prefills the short prompt itself
    (3, 0, 0, False, RequestPath.DISAGGREGATED),    # decode busy, prefill idle: the prefill worker takes it
    (3, 1, 0, False, RequestPath.DECODE_ONLY),      # both busy: the decode worker, as without the option
    (3, 0, 1, False, RequestPath.DECODE_ONLY),      # another attempt is on its way to the prefill pool (reserving)
    # the status counting 3 running was asked before this router's work there ended: not busy now
    (3, 0, 0, True, RequestPath.DECODE_ONLY),
])
def test_a_short_prompt_goes_to_an_idle_prefill_worker_while_decode_runs_a_batch(decode_running, prefill_running,
                                                                                  reserving, stale, path):
    pushed = KVPushed(META, 40 * 100, 1.3, 1.4)

    async def serve(*args):
        yield Ack(1.0, 1.1, 0, 1.05, 1.2)
        yield TokenChunk((7, 8), "ab", True, "length")

    prefill = Scripted(prefill=lambda *a: prefilled(pushed))
    decode = decode_handle(Ack(2.0, 2.1, 0), TokenChunk((8,), "b", True, "length"))
    decode.serve = _Method(decode, "serve", serve)
    p, d = worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode)
    p.alive = d.alive = True
    p.status, d.status = _status("prefill-0", "prefill", prefill_running), _status("decode-0", "decode", decode_running)
    runner = RequestRunner(Directory(p, d), make_policy("prefix_aware"), make_policy("prefix_aware"),
                           conditional=ConditionalPrefill(max_uncached_tokens=64, offload_when_prefill_idle=True))
    runner._reserving = reserving
    d.status_asked_at = 1.0
    d.charge(5)
    d.release(5)  # this router's last request there ended now, after that poll was asked ...
    if not stale:
        d.status_asked_at = d.released_at + 1.0  # ... or a poll asked since then still saw the batch
    chunks, trace = run(runner)
    assert [t for c in chunks for t in c.token_ids] == [7, 8]
    assert trace.path is path
    assert bool(prefill.calls) == (path is RequestPath.DISAGGREGATED)


class _SlowReserve:
    """A ``reserve`` whose answer comes after a real wait, as over Ray: concurrent requests overlap in it."""

    def __init__(self, actor: Scripted) -> None:
        self.actor = actor

    def remote(self, *args):
        self.actor.calls.append(("reserve", args))

        async def later() -> Reserved:
            await asyncio.sleep(0.02)
            return Reserved({"reserved": True})

        return asyncio.ensure_future(later())


@pytest.mark.parametrize("policy", ["least_loaded", "prefix_aware"])
def test_requests_arriving_together_spread_over_the_decode_workers_and_release_their_load(policy):
    # Before the load counted from the moment of choice, all four saw two idle decode workers
    # while their reservations were out and every one of them went to decode-0.
    pushed = KVPushed(META, 64, 1.3, 1.4)
    prefill = Scripted(prefill=lambda *a: prefilled(pushed))
    decodes = []
    for i in range(2):
        d = decode_handle(Ack(2.0, 2.1, 4), TokenChunk((8,), "b", True, "length"))
        d.reserve = _SlowReserve(d)
        decodes.append(worker(f"decode-{i}", "decode", d))
    p = worker("prefill-0", "prefill", prefill)
    runner = RequestRunner(Directory(p, *decodes), make_policy(policy), make_policy(policy))

    async def go() -> list[RequestTrace]:
        traces = [RequestTrace() for _ in range(4)]

        async def one(i: int) -> None:
            req = ParsedRequest(f"req-{i}", PROMPT, SamplingParams(max_tokens=2))
            async for _ in runner.run(req, traces[i]):
                pass

        await asyncio.gather(*(one(i) for i in range(4)))
        return traces

    traces = asyncio.run(go())
    assert sorted(t.decode_worker for t in traces) == ["decode-0", "decode-0", "decode-1", "decode-1"]
    assert [w.inflight_tokens for w in (p, *decodes)] == [0, 0, 0]  # every count released


def test_a_refused_reservation_releases_its_load_and_the_next_worker_is_tried():
    pushed = KVPushed(META, 64, 1.3, 1.4)
    prefill = Scripted(prefill=lambda *a: prefilled(pushed))
    full = decode_handle()
    full.reserve.reply = lambda *a: None  # no room
    room = decode_handle(Ack(2.0, 2.1, 4), TokenChunk((8,), "b", True, "length"))
    p, d0, d1 = worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", full), \
        worker("decode-1", "decode", room)
    runner = RequestRunner(Directory(p, d0, d1), make_policy("least_loaded"), make_policy("least_loaded"))
    _, trace = run(runner)
    assert trace.decode_worker == "decode-1" and full.called("reserve")
    assert (p.inflight_tokens, d0.inflight_tokens, d1.inflight_tokens) == (0, 0, 0)


@pytest.mark.parametrize("kind", ["decode", "colocated"])
def test_a_worker_serving_both_phases_is_charged_only_what_it_does_not_cache(kind):
    # A decode-only (or colocated) request's load is what its worker computes and generates,
    # not the prefix it caches.
    seen: list[int] = []

    async def serve(*args):
        seen.append(w.inflight_tokens)
        yield Ack(1.0, 1.1, 0, 1.05, 1.2, cached_tokens=32)
        yield TokenChunk((7, 8), "ab", True, "length")

    w = worker(f"{kind}-0", kind, Scripted(serve=serve))
    directory = Directory(worker("prefill-0", "prefill", Scripted()), w) if kind == "decode" else Directory(w)
    publish(directory.prefix_index, w.worker_id, PROMPT)
    run(RequestRunner(directory, make_policy("prefix_aware"), make_policy("prefix_aware"),
                      conditional=ConditionalPrefill(max_uncached_tokens=8), colocated=kind == "colocated"))
    assert seen == [len(PROMPT) - 32 + 2]  # 8 uncached prompt tokens + 2 to generate
    assert w.inflight_tokens == 0


def test_a_prefill_worker_is_charged_only_what_it_does_not_cache():
    loads: list[int] = []
    pushed = KVPushed(META, 8 * 100, 1.3, 1.4)

    def prefill_call(*args):
        loads.append(p.inflight_tokens)
        return prefilled(pushed)

    p = worker("prefill-0", "prefill", Scripted(prefill=prefill_call))
    directory = Directory(p, worker("decode-0", "decode", decode_handle(Ack(2.0, 2.1, 8),
                                                                         TokenChunk((8,), "b", True, "length"))))
    publish(directory.prefix_index, "prefill-0", PROMPT)
    run(RequestRunner(directory, make_policy("prefix_aware"), make_policy("prefix_aware")))
    assert loads == [len(PROMPT) - 32] and p.inflight_tokens == 0

