"""How the request runner dispatches on the workers' typed replies, against
scripted stand-ins for the worker actors (no Ray, no model)."""

from __future__ import annotations

import asyncio
import copy
import inspect
from typing import Any

import pytest

from engine.kv_cache import KVLayout
from engine.sampling_params import InvalidRequestError, SamplingParams
from kvtransfer.endpoints import InProcEndpoint
from router import request_runner
from router.directory import WorkerDirectory, WorkerInfo
from router.policy import make_policy
from router.request_runner import (NoCapacityError, RequestFailedError, RequestRunner, RequestTrace,
                                   WorkerFailedError)
from router.validation import ParsedRequest
from router.prefix_index import PrefixIndex
from worker_common.messages import (Ack, ErrorReason, KVHandoffMeta, KVPushed, PrefillResult, Reserved, TokenChunk,
                                    WorkerError)

META = KVHandoffMeta(KVLayout(2, 1, 4, "float32"), (1, 2, 3), (7,), 5)
FIRST = TokenChunk((7,), "a")


class _Stream:
    """A streaming call's reply: each ``__anext__`` gives an awaitable of the next item, as Ray's does."""

    def __init__(self, gen) -> None:
        self.gen = gen

    async def __anext__(self) -> Any:
        item = await self.gen.__anext__()
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(item)
        return fut


class _Method:
    def __init__(self, actor: Scripted, name: str, reply) -> None:
        self.actor, self.name, self.reply = actor, name, reply

    def remote(self, *args) -> Any:
        args = copy.deepcopy(args)  # Ray serializes the arguments at call time
        self.actor.calls.append((self.name, args))
        out = self.reply(*args)
        if inspect.isasyncgen(out):
            return _Stream(out)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(out)
        return fut


class Scripted:
    """An actor handle whose methods answer as scripted; ``calls`` records (method, args)."""

    def __init__(self, **replies) -> None:
        self.calls: list[tuple[str, tuple]] = []
        for name in ("abort", "release"):
            replies.setdefault(name, lambda *a: True)
        for name, reply in replies.items():
            setattr(self, name, _Method(self, name, reply))

    def called(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]


class Directory:
    def __init__(self, *workers: WorkerInfo) -> None:
        self.workers = {w.worker_id: w for w in workers}
        self.prefix_index = PrefixIndex()

    loads = WorkerDirectory.loads

    def of_kind(self, kind: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.kind == kind]


def worker(worker_id: str, kind: str, handle: Scripted) -> WorkerInfo:
    return WorkerInfo(worker_id, kind, handle, InProcEndpoint(worker_id=worker_id), "node")


def decode_handle(*events) -> Scripted:
    async def generate(*args):
        for ev in events:
            yield ev

    return Scripted(reserve=lambda *a: Reserved({"reserved": True}), rearm=lambda *a: {"rearmed": True}, generate=generate)


def run(runner: RequestRunner, max_tokens: int = 2) -> tuple[list[TokenChunk], RequestTrace]:
    req = ParsedRequest("req", [1, 2, 3], SamplingParams(max_tokens=max_tokens))
    trace = RequestTrace()

    async def go() -> list[TokenChunk]:
        return [ev async for ev in runner.run(req, trace)]

    return asyncio.run(go()), trace


def runner_for(*workers: WorkerInfo, **kw) -> RequestRunner:
    return RequestRunner(Directory(*workers), make_policy("round_robin"), make_policy("round_robin"), **kw)


def prefilled(push) -> PrefillResult:
    return PrefillResult("prefill-0", FIRST, 1.0, 1.1, 1.2, push)


def test_a_held_kv_is_pushed_again_and_the_stream_follows():
    pushed = KVPushed(META, 64, 1.3, 1.4)
    prefill = Scripted(prefill=lambda *a: prefilled(WorkerError(ErrorReason.TRANSFER_FAILED, "reset", kv_held=True)),
                       resend=lambda *a: pushed)
    decode = decode_handle(Ack(2.0, 2.1, 4, t_scheduled=2.05), TokenChunk((8,), "b", True, "length"))
    chunks, trace = run(runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode)))
    assert chunks == [FIRST, TokenChunk((8,), "b", True, "length")]
    (transfer_id, wire_id, *_), = decode.called("rearm")
    assert prefill.called("resend")[0][:2] == (transfer_id, wire_id) and wire_id != transfer_id
    generate_args, = decode.called("generate")
    assert generate_args[1] == META and generate_args[4] == "a"  # the metadata whole; the text sent so far
    assert prefill.called("release") == [(transfer_id,)]  # freed once the decode side acknowledged
    assert not prefill.called("abort") and not decode.called("abort")
    assert (trace.transfer_bytes, trace.transfer_start, trace.decode_start, trace.attempts) == (64, 1.3, 2.05, 1)


def test_a_refused_request_fails_with_its_field():
    prefill = Scripted(prefill=lambda *a: WorkerError(ErrorReason.INVALID_REQUEST, "too long", field="prompt"))
    runner = runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode_handle()))
    with pytest.raises(InvalidRequestError) as e:
        run(runner)
    assert (e.value.field, e.value.reason) == ("prompt", "too long")
    assert len(prefill.called("prefill")) == 1


def test_a_kv_that_failed_twice_is_recomputed_on_the_same_pair_but_an_aborted_prefill_is_not():
    held = WorkerError(ErrorReason.TRANSFER_FAILED, "reset", kv_held=True)
    prefill = Scripted(prefill=lambda *a: prefilled(held), resend=lambda *a: held)
    runner = runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode_handle()),
                        max_attempts=2)
    with pytest.raises(WorkerFailedError, match="transfer_failed: reset"):
        run(runner)
    assert len(prefill.called("prefill")) == 2  # not pinned on the prefill worker: the next attempt used it again

    prefill = Scripted(prefill=lambda *a: WorkerError(ErrorReason.ABORTED))
    runner = runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode_handle()),
                        max_attempts=2, queue_timeout_s=0.2)
    with pytest.raises(NoCapacityError):  # pinned: no other prefill worker to try
        run(runner)
    assert len(prefill.called("prefill")) == 1


def test_an_error_in_the_decode_stream_resumes_on_another_decode_worker(monkeypatch):
    monkeypatch.setattr(request_runner.ray, "cancel", lambda ref: None)
    second = TokenChunk((9,), "c", True, "length")
    prefill = Scripted(prefill=lambda *a: prefilled(KVPushed(META, 64, 1.3, 1.4)) if a[5] is None
                       else PrefillResult("prefill-0", second, 3.0, 3.1, 3.2, None))
    broken = decode_handle(Ack(2.0, 2.1, 4), WorkerError(ErrorReason.TRANSFER_FAILED, "lost"))
    spare = decode_handle()
    runner = runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", broken),
                        worker("decode-1", "decode", spare))
    chunks, trace = run(runner)
    assert [c.token_ids for c in chunks] == [(7,), (9,)] and trace.attempts == 2
    resumed = prefill.called("prefill")[1]
    assert resumed[5] == [7] and resumed[6] == "a"  # the second attempt resumes after what the client has
    assert broken.called("abort") and spare.called("reserve")


def test_a_request_the_engine_failed_is_not_retried_on_another_prefill_worker():
    failed = WorkerError(ErrorReason.REQUEST_FAILED, "sampling failed: every logit is non-finite")
    first, spare = Scripted(prefill=lambda *a: failed), Scripted(prefill=lambda *a: failed)
    decode = decode_handle()
    runner = runner_for(worker("prefill-0", "prefill", first), worker("prefill-1", "prefill", spare),
                        worker("decode-0", "decode", decode), max_attempts=3)
    with pytest.raises(RequestFailedError, match="prefill-0: sampling failed: every logit is non-finite"):
        run(runner)
    assert len(first.called("prefill")) == 1 and not spare.called("prefill") and runner.retries == 0
    (transfer_id, *_), = decode.called("reserve")
    assert decode.called("abort") == [(transfer_id,)]  # the reservation is dropped at once


def test_a_request_the_engine_failed_while_decoding_is_not_resumed_elsewhere(monkeypatch):
    monkeypatch.setattr(request_runner.ray, "cancel", lambda ref: None)
    prefill = Scripted(prefill=lambda *a: prefilled(KVPushed(META, 64, 1.3, 1.4)))
    failing = decode_handle(Ack(2.0, 2.1, 4), WorkerError(ErrorReason.REQUEST_FAILED, "sampling failed: nan"))
    spare = decode_handle()
    runner = runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", failing),
                        worker("decode-1", "decode", spare), max_attempts=3)
    req = ParsedRequest("req", [1, 2, 3], SamplingParams(max_tokens=4))
    got: list[TokenChunk] = []

    async def go() -> None:
        async for ev in runner.run(req, RequestTrace()):
            got.append(ev)

    with pytest.raises(RequestFailedError, match="decode-0: sampling failed: nan"):
        asyncio.run(go())
    assert got == [FIRST]  # what the client had before the failure
    assert not spare.called("reserve") and len(prefill.called("prefill")) == 1 and runner.retries == 0
    assert failing.called("abort") and prefill.called("abort")


def test_a_request_its_first_token_finished_drops_the_decode_reservation():
    """max_tokens=1, EOS or a stop token first: no decode stream is opened, and the
    blocks reserved for it on the decode worker are freed at once (not at lease end)."""
    done = TokenChunk((7,), "a", True, "length")
    prefill = Scripted(prefill=lambda *a: PrefillResult("prefill-0", done, 1.0, 1.1, 1.2, None))
    decode = decode_handle()
    chunks, _ = run(runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode)),
                    max_tokens=1)
    assert chunks == [done]
    (transfer_id, *_), = decode.called("reserve")
    assert not decode.called("generate")
    assert decode.called("abort") == [(transfer_id,)]


def test_a_reserve_that_times_out_is_aborted_on_its_decode_worker(monkeypatch):
    """The router stops waiting, but the call may still reserve blocks when the
    worker gets to it: it is aborted there, so those blocks come back."""
    monkeypatch.setattr(request_runner, "CALL_TIMEOUT_S", 0.05)

    def stuck(*args):
        return asyncio.get_running_loop().create_future()  # never answers

    slow = Scripted(reserve=stuck)
    slow.reserve.remote = lambda *args: (slow.calls.append(("reserve", args)), stuck())[1]
    prefill = Scripted(prefill=lambda *a: prefilled(None))
    runner = runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", slow),
                        queue_timeout_s=0.2)
    with pytest.raises(NoCapacityError):
        run(runner)
    (transfer_id, *_), = slow.called("reserve")
    assert slow.called("abort") == [(transfer_id,)]


def test_workers_see_ids_minted_per_attempt_not_the_client_s(monkeypatch):
    """Two requests with the same client id (as if the server let both in), one of them
    cancelled: each attempt ran under its own id, nothing of the client's id reached a
    worker, and the cancel aborted only the cancelled request's id."""
    monkeypatch.setattr(request_runner.ray, "cancel", lambda ref: None)

    async def generate(*args):
        yield Ack(2.0, 2.1, 4)
        await asyncio.sleep(3600 if args[0] == held[0] else 0)
        yield TokenChunk((8,), "b", True, "length")

    held: list[str] = []
    prefill = Scripted(prefill=lambda *a: prefilled(KVPushed(META, 64, 1.3, 1.4)))

    def reserve(transfer_id, *a):
        held.append(transfer_id)
        return Reserved({"reserved": True})

    decode = Scripted(reserve=reserve, generate=generate)
    runner = runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", decode))
    req = ParsedRequest("victim", [1, 2, 3], SamplingParams(max_tokens=2))

    async def go() -> list[TokenChunk]:
        async def consume() -> list[TokenChunk]:
            return [ev async for ev in runner.run(req, RequestTrace())]

        first = asyncio.ensure_future(consume())
        while not held:
            await asyncio.sleep(0.001)
        second = await consume()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return second

    assert [c.token_ids for c in asyncio.run(go())] == [(7,), (8,)]
    assert len(held) == 2 and held[0] != held[1]
    assert not any("victim" in args[0] for _, args in decode.calls + prefill.calls)
    assert decode.called("abort") == [(held[0],)] and prefill.called("abort") == [(held[0],)]
    assert all(len(t) >= 32 for t in held)  # 128 random bits: not guessable


def test_a_group_is_prefilled_once_and_after_a_decode_failure_each_sample_resumes_on_its_own(monkeypatch):
    """n = 2: one prefill (n passed on) gives both first tokens and one push; the decode
    stream dies after sample 0's second token; each sample then resumes by itself after
    what its client has, with its own seed, and both finish."""
    monkeypatch.setattr(request_runner.ray, "cancel", lambda ref: None)
    firsts = (TokenChunk((7,), "a"), TokenChunk((5,), "e", index=1))
    last = TokenChunk((9,), "c", True, "length")
    prefill = Scripted(prefill=lambda *a: (
        PrefillResult("prefill-0", firsts[0], 1.0, 1.1, 1.2, KVPushed(META, 64, 1.3, 1.4), others=firsts[1:])
        if a[5] is None else PrefillResult("prefill-0", last, 3.0, 3.1, 3.2, None)))
    broken = decode_handle(Ack(2.0, 2.1, 4), TokenChunk((8,), "b", index=0),
                           WorkerError(ErrorReason.TRANSFER_FAILED, "lost"))
    runner = runner_for(worker("prefill-0", "prefill", prefill), worker("decode-0", "decode", broken),
                        worker("decode-1", "decode", decode_handle()))
    req = ParsedRequest("req", [1, 2, 3], SamplingParams(max_tokens=3, temperature=1.0, seed=10), n=2)

    async def go() -> list[TokenChunk]:
        return [ev async for ev in runner.run(req, RequestTrace())]

    chunks = asyncio.run(go())
    by_sample = {i: [t for c in chunks if c.index == i for t in c.token_ids] for i in (0, 1)}
    assert by_sample == {0: [7, 8, 9], 1: [5, 9]}
    assert [c.index for c in chunks if c.finished] in ([0, 1], [1, 0])
    group, *resumed = prefill.called("prefill")
    assert group[8] == 2 and broken.called("reserve")[0][5] == 2  # one prefill and one reservation for both
    assert sorted((a[5], a[6], a[2].seed, a[8]) for a in resumed) == [([5], "e", 11, 1), ([7, 8], "ab", 10, 1)]
