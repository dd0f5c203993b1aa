"""One request's path through the cluster (docs/architecture.md, "Request lifecycle").

A request runs as one or more *attempts*; each attempt is:

1. Pick a pair: the policy ranks prefill and decode workers (workers that
   already failed this request are skipped).
2. Reserve: the first decode worker in rank order that has room reserves
   blocks for the KV under a lease; with no room anywhere the request waits
   (bounded by ``queue_timeout_s`` and the client's deadline), then is
   refused as exhausted.
3. Prefill: the prefill worker batches, prefills, pushes the KV to the
   reservation and returns the first token, which streams to the client. A
   failed push is retried once into the same reservation (``rearm`` +
   ``resend``) before the attempt gives up.
4. Decode: the decode worker's stream acknowledges the KV (the prefill
   worker then frees its copy) and yields tokens until the request ends.
5. Any exit — finish, error, client cancel, deadline — tells both workers to
   drop the attempt, so their blocks are freed within one call, and a call
   that arrives after its abort is refused by the worker. A request that its
   first token finished never reaches the decode worker: its reservation
   there is dropped at once too.

When an attempt fails (a worker died or stalled, the KV could not be moved),
the next attempt starts over on other workers from the prompt plus the
tokens the client already has: nothing is sent twice, nothing is missing,
and greedy output is the same as without the failure. After
``max_attempts`` the client gets UNAVAILABLE. A request that a worker's
engine failed on its own (``ErrorReason.REQUEST_FAILED``) is not retried:
the client gets INTERNAL with the engine's message.

In colocated mode (``pools.mode: colocated``) an attempt is a single call:
one worker runs both phases (:meth:`DecodeWorker.serve`).

Prefix caching shapes the disaggregated attempt twice. The reservation
names the KV's token ids, and the decode worker answers how many leading
tokens it already caches: the prefill worker then pushes only the KV after
them (``Timings.decode_cached_tokens``, ``transfer_bytes_saved``). And
*conditional disaggregation* (:class:`ConditionalPrefill`): when the part of
the prompt that the best-ranked decode worker does not cache (by the
router's prefix index) is short, or that worker caches most of it, the
attempt skips the prefill pool altogether and runs as one ``serve`` call on
that decode worker, which prefills the rest itself (``Timings.path``
``decode_only``) -- unless that worker is decoding a batch and a prefill
worker sits idle with at least as much of the prompt cached: the short
prefill then runs there, so it does not stall the running batch for a step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import ray

from engine.sampling_params import InvalidRequestError
from kvtransfer.endpoints import Endpoint
from observability.stages import RequestPath, Timeline
from router.directory import WorkerDirectory, WorkerInfo
from router.fan_in import fan_in
from router.policy import RoutingPolicy
from router.prefix_index import PrefixQuery
from router.validation import ParsedRequest
from worker_common.messages import Ack, ErrorReason, KVPushed, PrefillResult, Reserved, TokenChunk, WorkerError
from worker_common.timeouts import within

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 30.0  # any control call; a worker that takes longer is treated as failed
DEADLINE_GRACE_S = 1.0  # how long past a request's deadline its own expiry may take to arrive


class NoCapacityError(RuntimeError):
    """No decode worker could reserve blocks in time (RESOURCE_EXHAUSTED)."""


class WorkerFailedError(RuntimeError):
    """Every attempt of this request failed (UNAVAILABLE)."""


class RequestFailedError(RuntimeError):
    """A worker's engine failed this request on its own (INTERNAL): not retried,
    since the same request would fail the same way elsewhere, and the worker
    is not blamed (the rest of its batch went on)."""


class AttemptFailed(RuntimeError):
    """One attempt failed; the request may be retried elsewhere."""

    def __init__(self, worker_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.worker_id = worker_id


@dataclass(frozen=True)
class ConditionalPrefill:
    """When a disaggregated attempt lets the decode worker prefill by itself.

    Decode-only when the tokens the chosen decode worker does not cache
    number at most ``max_uncached_tokens``, or when it caches at least
    ``min_cached_ratio`` of them; ``0`` / ``None`` turn each ground off (the
    defaults: always disaggregated). A prefill worker is worth its transfer
    only for a long uncached part: for a short one the decode worker's
    prefill costs less than the hop, and for a mostly cached prompt there is
    little left to compute.
    """

    max_uncached_tokens: int = 0
    min_cached_ratio: float | None = None
    # A short prompt still goes to a prefill worker when the decode worker has a
    # batch running and that prefill worker is idle and caches at least as much of
    # it: the same compute on a spare core instead of a step-long stall of the batch.
    offload_when_prefill_idle: bool = False

    @property
    def enabled(self) -> bool:
        return self.max_uncached_tokens > 0 or self.min_cached_ratio is not None

    def decode_only(self, kv_tokens: int, cached_tokens: int) -> bool:
        """Whether ``kv_tokens`` tokens, ``cached_tokens`` of them cached on the decode worker, skip the prefill pool."""
        if kv_tokens - cached_tokens <= self.max_uncached_tokens:
            return True
        return self.min_cached_ratio is not None and cached_tokens >= self.min_cached_ratio * kv_tokens

    def offload(self, decode_cached_tokens: int, decode_busy: bool, prefill_cached_tokens: int | None) -> bool:
        """Whether a prompt :meth:`decode_only` accepted goes to a prefill worker after all:
        ``decode_busy``, the decode worker has sequences running; ``prefill_cached_tokens``,
        what the best idle prefill worker caches of it (``None``: no prefill worker is idle).
        Never when the decode worker caches more than that worker: it would recompute it."""
        return (self.offload_when_prefill_idle and decode_busy and prefill_cached_tokens is not None
                and prefill_cached_tokens >= decode_cached_tokens)


@dataclass
class RequestTrace(Timeline):
    """One request's stage stamps (:class:`~observability.stages.Timeline`)
    plus what the router reports with them.

    Router stamps and worker stamps share the machine's clock; on retry the
    stage stamps are those of the last attempt, ``attempts`` counts them.
    """

    token_times: list[float] = field(default_factory=list)  # one per output token, as it left the router
    transfer_bytes: int = 0
    transfer_bytes_saved: int = 0  # KV bytes not moved: the decode worker had them cached
    prefill_cached_tokens: int = 0  # prompt tokens the prefilling worker found cached
    decode_cached_tokens: int = 0  # prompt tokens whose KV the decode worker had cached (not moved)
    path: RequestPath | None = None
    prefill_worker: str = ""
    decode_worker: str = ""
    attempts: int = 0
    num_output_tokens: int = 0

    def token_sent(self, n: int) -> None:
        now = time.time()
        if not self.first_token and n:
            self.first_token = now
        self.token_times += [now] * n
        self.num_output_tokens += n

    def new_attempt(self) -> None:
        super().new_attempt()
        self.attempts += 1
        self.transfer_bytes = self.transfer_bytes_saved = 0
        self.prefill_cached_tokens = self.decode_cached_tokens = 0
        self.path = None


def attempt_id(request_id: str, attempt: int) -> str:
    """The id one attempt runs under on the workers (reservation, KV transfer,
    engine request, abort): minted here, 128 random bits, nothing of the
    client's ``request_id`` in it. So no client can reach another's request on
    a worker by choosing or guessing an id, two requests with the same client
    id never share one, and client-chosen characters never reach a transport."""
    internal = f"a{attempt}-{uuid.uuid4().hex}"
    log.debug("request %s attempt %d runs as %s", request_id, attempt, internal)
    return internal


def _token_event(chunk: TokenChunk, trace: RequestTrace) -> TokenChunk:
    """A worker's tokens on their way to the client, stamped on the trace as they leave."""
    trace.token_sent(len(chunk.token_ids))
    return chunk


async def _merge(streams: dict[int, AsyncIterator[TokenChunk]]) -> AsyncIterator[TokenChunk]:
    """The chunks of one-sample streams, each relabelled with its sample's index, as they come.
    The first stream that fails fails the merge; however it ends, every stream is closed
    (which drops its attempt on the workers)."""
    async with aclosing(fan_in(streams)) as merged:
        async for index, ev in merged:
            yield replace(ev, index=index)


def _failure(error: WorkerError, worker_id: str | None, where: str) -> Exception:
    """What a worker's error means for the request: a refused request fails it
    (INVALID_ARGUMENT), and so does one the engine failed alone (INTERNAL);
    anything else fails this attempt, pinned on ``worker_id`` (``None``: on
    neither worker) so the next attempt avoids it."""
    if error.reason is ErrorReason.INVALID_REQUEST:
        return InvalidRequestError(error.field or "request", error.detail)
    if error.reason is ErrorReason.REQUEST_FAILED:
        return RequestFailedError(f"{where}: {error.detail}")
    return AttemptFailed(worker_id, f"{where}: {error}")


@dataclass
class _Progress:
    """What the client has been sent so far: a retry resumes after it."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""


def _idle(worker: WorkerInfo) -> bool:
    """Nothing of this router's in flight there, and nothing running or queued at its last poll."""
    st = worker.status
    return worker.alive and worker.inflight_tokens == 0 and (st is None or st.running + st.waiting == 0)


def _decoding(worker: WorkerInfo) -> bool:
    """Sequences of this router's run there, or did at its last poll, if that poll was asked after this
    router last released work there (an earlier one may count that finished work as running; another
    router's sequences then go unseen until the next poll, at most the directory's refresh later)."""
    st = worker.status
    return worker.inflight_tokens > 0 or (st is not None and st.running > 0
                                          and worker.status_asked_at > worker.released_at)


class RequestRunner:
    """Runs requests through the pools; shared by all of the router's RPCs."""

    def __init__(self, directory: WorkerDirectory, prefill_policy: RoutingPolicy, decode_policy: RoutingPolicy,
                 *, transfer_timeout_s: float = 30.0, queue_timeout_s: float = 30.0, max_attempts: int = 3,
                 transfer_retries: int = 1, colocated: bool = False,
                 conditional: ConditionalPrefill = ConditionalPrefill()) -> None:
        self.directory = directory
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.transfer_timeout_s = transfer_timeout_s
        self.queue_timeout_s = queue_timeout_s
        self.max_attempts = max_attempts
        self.transfer_retries = transfer_retries
        self.colocated = colocated
        self.conditional = conditional
        self.retries = 0  # attempts beyond the first, over all requests (a metric)
        # Attempts in _reserve: bound for a prefill worker whose inflight count may not show them
        # (waiting after a refused reservation, or a prompt that worker caches whole): while any
        # is, no prefill worker counts as idle for an offload.
        self._reserving = 0

    async def run(self, req: ParsedRequest, trace: RequestTrace,
                  deadline: float | None = None) -> AsyncIterator[TokenChunk]:
        """Stream ``req``'s tokens; ``deadline`` (``time.monotonic()``) bounds waiting for capacity."""
        progress = [_Progress() for _ in range(req.n)]
        ended: set[int] = set()  # samples that have finished
        failed: set[str] = set()
        last: AttemptFailed | None = None
        for attempt in range(1, self.max_attempts + 1):
            trace.new_attempt()
            if attempt > 1:
                self.retries += 1
            run_one = self._colocated_attempt if self.colocated else self._disaggregated_attempt
            if req.n > 1 and any(p.token_ids for p in progress):
                # Samples already streamed: each unfinished one resumes on its own after what
                # its client has (the one-sample resume below), all of them concurrently.
                attempt_events = _merge({i: run_one(self._sample(req, i), attempt, progress[i], trace, failed, deadline)
                                         for i in range(req.n) if i not in ended})
            else:
                attempt_events = run_one(req, attempt, progress[0], trace, failed, deadline)
            try:
                # aclosing: however this request ends, the attempt's cleanup
                # (dropping it on both workers) runs now, not when collected.
                async with aclosing(attempt_events) as events:
                    async for ev in events:
                        progress[ev.index].token_ids += ev.token_ids
                        progress[ev.index].text += ev.text
                        if ev.finished:
                            ended.add(ev.index)
                        yield ev
                        if len(ended) == req.n:
                            return
                raise AttemptFailed(None, "the worker's stream ended before the request finished")
            except AttemptFailed as f:
                last = f
                if f.worker_id:
                    failed.add(f.worker_id)
                log.warning("request %s attempt %d failed after %d tokens: %s", req.request_id, attempt,
                            sum(len(p.token_ids) for p in progress), f)
        raise WorkerFailedError(f"request failed after {self.max_attempts} attempts; last: {last}")

    @staticmethod
    def _sample(req: ParsedRequest, index: int) -> ParsedRequest:
        """Sample ``index`` of ``req`` as a request of its own (its resume after a failure)."""
        return replace(req, params=req.params.for_sample(index), n=1)

    # ---------------------------------------------------------- disaggregated
    async def _disaggregated_attempt(self, req: ParsedRequest, attempt: int, progress: _Progress,
                                     trace: RequestTrace, failed: set[str],
                                     deadline: float | None) -> AsyncIterator[TokenChunk]:
        kv_ids = list(req.prompt_token_ids) + progress.token_ids
        kv_tokens = len(kv_ids)
        query = PrefixQuery(kv_ids)
        solo = self._decode_only_worker(query, failed)
        if solo is not None:
            worker, cached = solo  # its load is the part it computes: cached tokens are neither computed nor moved
            async for ev in self._serve_attempt(worker, req, attempt, progress, trace, RequestPath.DECODE_ONLY,
                                                cached_tokens=cached):
                yield ev
            return
        transfer_id = attempt_id(req.request_id, attempt)
        remaining = (req.params.max_tokens - len(progress.token_ids)) * req.n
        self._reserving += 1
        try:
            # Returns with both workers' inflight_tokens already counting this attempt
            # (prefill_load, remaining); the finally blocks below release them.
            prefill, decode, reserved, prefill_load = await self._reserve(transfer_id, query, failed, deadline,
                                                                          remaining, req.n)
        finally:
            self._reserving -= 1
        endpoint, kv_start = reserved.endpoint, reserved.cached_tokens
        trace.reserved = time.time()
        trace.path = RequestPath.DISAGGREGATED
        trace.decode_cached_tokens = kv_start
        trace.prefill_worker, trace.decode_worker = prefill.worker_id, decode.worker_id
        stream = None
        done = False
        ended: set[int] = set()
        try:
            try:
                prefilled = await self._prefill(prefill, decode, transfer_id, req, progress, endpoint, kv_ids,
                                                kv_start)
            finally:
                prefill.release(prefill_load)
            trace.prefill_queued, trace.prefill_start = prefilled.t_received, prefilled.t_prefill_start
            trace.prefill_end = prefilled.t_prefill_end
            trace.prefill_cached_tokens = prefilled.cached_tokens
            pushed = prefilled.push
            if isinstance(pushed, KVPushed):
                trace.transfer_start, trace.transfer_end = pushed.t_transfer_start, pushed.t_transfer_end
                trace.transfer_bytes = pushed.transfer_bytes
                # Bytes per token from what moved: the cached tokens would have cost the same each.
                trace.transfer_bytes_saved = pushed.transfer_bytes * kv_start // max(kv_tokens - kv_start, 1)
            done = prefilled.finished
            for first in prefilled.firsts:  # one per sample: the n first tokens came from the one prefill
                if first.finished:
                    ended.add(first.index)
                yield _token_event(first, trace)
            if done or not isinstance(pushed, KVPushed):  # finished, or (never) unfinished with no KV sent
                return
            trace.decode_queued = time.time()
            stream = decode.handle.generate.remote(transfer_id, pushed.handoff, req.params,
                                                   self.transfer_timeout_s, progress.text)
            async for ev in self._events(decode, stream, CALL_TIMEOUT_S + self.transfer_timeout_s):
                match ev:
                    case Ack():
                        trace.decode_start = ev.t_scheduled if ev.t_scheduled is not None else ev.t_joined
                        prefill.handle.release.remote(transfer_id)  # fire and forget: the hold has a lease anyway
                    case TokenChunk():
                        if ev.finished:
                            ended.add(ev.index)
                        done = len(ended) == req.n
                        yield _token_event(ev, trace)
                        if done:
                            return
        finally:
            decode.release(remaining)
            if not done:
                # Cancelled or failed: drop the attempt on both sides without
                # waiting (the handler may itself be cancelled).
                if stream is not None:
                    ray.cancel(stream)
                prefill.handle.abort.remote(transfer_id)
                decode.handle.abort.remote(transfer_id)
            elif stream is None:
                # The first token finished the request (max_tokens=1, EOS or a
                # stop first): the decode worker's reservation will never be
                # used, so free it now rather than when its lease runs out.
                decode.handle.abort.remote(transfer_id)

    async def _prefill(self, prefill: WorkerInfo, decode: WorkerInfo, transfer_id: str, req: ParsedRequest,
                       progress: _Progress, endpoint: Endpoint, kv_ids: list[int], kv_start: int) -> PrefillResult:
        """Prefill and push the KV from token ``kv_start`` on (the decode side
        caches the rest); a failed push is retried into the same reservation.
        The result's ``push`` is a :class:`KVPushed`, or ``None`` when the first token finished the request."""
        timeout = CALL_TIMEOUT_S + self.transfer_timeout_s
        kv_tokens = len(kv_ids)
        result = await self._call(prefill, prefill.handle.prefill.remote(
            transfer_id, req.prompt_token_ids, req.params, endpoint, self.transfer_timeout_s,
            progress.token_ids or None, progress.text or None, kv_start, req.n), timeout)
        match result:
            case WorkerError():
                raise _failure(result, prefill.worker_id, prefill.worker_id)
            case PrefillResult():
                push = result.push
            case _:
                raise AttemptFailed(prefill.worker_id, f"{prefill.worker_id}: unexpected reply {result!r}")
        for retry in range(1, self.transfer_retries + 1):
            if not (isinstance(push, WorkerError) and push.kv_held):
                break
            log.warning("KV transfer %s failed (%s); pushing it again", transfer_id, push)
            wire_id = f"{transfer_id}-r{retry}"  # a fresh id: nothing of the failed push is reused
            endpoint = await self._call(decode, decode.handle.rearm.remote(
                transfer_id, wire_id, kv_tokens, prefill.endpoint, self.transfer_timeout_s, kv_ids, kv_start),
                CALL_TIMEOUT_S)
            if endpoint is None:
                break
            push = await self._call(prefill, prefill.handle.resend.remote(
                transfer_id, wire_id, endpoint, self.transfer_timeout_s), timeout)
        if isinstance(push, WorkerError):
            # A transfer that failed twice is not pinned on either worker: the
            # next attempt recomputes the prefill, on whichever pair ranks first.
            raise _failure(push, None if push.kv_held else prefill.worker_id, prefill.worker_id)
        return replace(result, push=push)

    def _wait_limit(self, deadline: float | None) -> float:
        """Until when (``time.monotonic()``) to wait for capacity: the queue timeout or the client's deadline."""
        limit = time.monotonic() + self.queue_timeout_s
        return limit if deadline is None else min(limit, deadline)

    @staticmethod
    async def _out_of_capacity(limit: float, deadline: float | None, why: str) -> NoReturn:
        """The wait for capacity ran out at ``limit``. When that limit is the request's own
        deadline, the deadline ends the request (DEADLINE_EXCEEDED, from the caller's
        ``until``), not a capacity error that merely fired a moment before it: wait for it."""
        if deadline is not None and limit >= deadline:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()) + DEADLINE_GRACE_S)
        raise NoCapacityError(why)

    def _decode_only_worker(self, query: PrefixQuery, failed: set[str]) -> tuple[WorkerInfo, int] | None:
        """The decode worker that should prefill this request itself (conditional
        disaggregation) and the prompt tokens it caches, or ``None``: the best-ranked
        live one, if the part of the prompt it does not cache is short or small enough."""
        if not self.conditional.enabled:
            return None
        decodes = {w.worker_id: w for w in self.directory.of_kind("decode") if w.worker_id not in failed}
        if not decodes:
            return None
        best = decodes[self.decode_policy.rank(self.directory.loads(list(decodes.values()), query))[0]]
        cached = self.directory.prefix_index.cached_tokens(best.worker_id, query)
        if not self.conditional.decode_only(len(query.token_ids), cached):
            return None
        if self.conditional.offload_when_prefill_idle:
            idle = [] if self._reserving else [w for w in self.directory.of_kind("prefill")
                                               if w.worker_id not in failed and _idle(w)]
            prefill_cached = max((self.directory.prefix_index.cached_tokens(w.worker_id, query) for w in idle),
                                 default=None)
            if self.conditional.offload(cached, _decoding(best), prefill_cached):
                return None
        return best, cached

    async def _reserve(self, transfer_id: str, query: PrefixQuery, failed: set[str], deadline: float | None,
                       remaining: int, n: int = 1) -> tuple[WorkerInfo, WorkerInfo, Reserved, int]:
        """Choose a prefill worker and reserve room on a decode worker; also returns the prefill
        worker's load from this prompt (its tokens that worker does not cache, by the index).

        On return that load is in the prefill worker's ``inflight_tokens`` and ``remaining`` in
        the decode worker's; the caller releases both. Each is counted from the moment of
        choice, not from the reservation's answer: requests that arrive together must see each
        other's load, or every one of them picks the worker that looked idle before any came."""
        limit = self._wait_limit(deadline)
        delay = 0.005
        kv_tokens = len(query.token_ids)
        while True:
            prefills = [w for w in self.directory.of_kind("prefill") if w.worker_id not in failed]
            decodes = {w.worker_id: w for w in self.directory.of_kind("decode") if w.worker_id not in failed}
            if prefills and decodes:
                by_id = {w.worker_id: w for w in prefills}
                prefill = by_id[self.prefill_policy.rank(self.directory.loads(prefills, query))[0]]
                prefill_load = kv_tokens - self.directory.prefix_index.cached_tokens(prefill.worker_id, query)
                prefill.charge(prefill_load)
                chosen = False
                try:
                    for worker_id in self.decode_policy.rank(self.directory.loads(list(decodes.values()), query)):
                        decode = decodes[worker_id]
                        reserved = await self._reserve_on(decode, transfer_id, kv_tokens, prefill, query.token_ids,
                                                          remaining, n, failed)
                        if reserved is not None:
                            chosen = True
                            return prefill, decode, reserved, prefill_load
                finally:
                    if not chosen:
                        prefill.release(prefill_load)
            if time.monotonic() >= limit:
                await self._out_of_capacity(limit, deadline, f"no decode worker had room for {kv_tokens} tokens "
                                                             f"of KV within {self.queue_timeout_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _reserve_on(self, decode: WorkerInfo, transfer_id: str, kv_tokens: int, prefill: WorkerInfo,
                          token_ids: list[int], remaining: int, n: int, failed: set[str]) -> Reserved | None:
        """One reservation call on ``decode``: its answer, or ``None`` when it refused (full) or
        failed (then it joins ``failed``). ``remaining`` is in its ``inflight_tokens`` while the
        call is out, and stays there if it reserved."""
        decode.charge(remaining)
        reserved = None
        try:
            reserved = await within(
                decode.handle.reserve.remote(transfer_id, kv_tokens, prefill.endpoint, self.transfer_timeout_s,
                                             token_ids, n),
                timeout_s=CALL_TIMEOUT_S)
        except asyncio.CancelledError:
            # The client went away mid-call: the reservation may still
            # happen there, so drop it (the worker refuses it if late).
            decode.handle.abort.remote(transfer_id)
            raise
        except Exception as exc:  # dead or stuck worker: skip it for this request
            log.warning("reserve on %s failed: %r", decode.worker_id, exc)
            failed.add(decode.worker_id)
            # A stuck call may still reserve when it runs: drop it
            # there (the worker refuses it if it comes later).
            decode.handle.abort.remote(transfer_id)
        finally:
            if reserved is None:
                decode.release(remaining)
        return reserved

    # --------------------------------------------------------------- colocated
    async def _colocated_attempt(self, req: ParsedRequest, attempt: int, progress: _Progress,
                                 trace: RequestTrace, failed: set[str],
                                 deadline: float | None) -> AsyncIterator[TokenChunk]:
        worker, cached = await self._pick(req, progress, failed, deadline)
        async for ev in self._serve_attempt(worker, req, attempt, progress, trace, RequestPath.COLOCATED,
                                            cached_tokens=cached):
            yield ev

    async def _serve_attempt(self, worker: WorkerInfo, req: ParsedRequest, attempt: int, progress: _Progress,
                             trace: RequestTrace, path: RequestPath, cached_tokens: int = 0) -> AsyncIterator[TokenChunk]:
        """One ``serve`` call: ``worker`` runs both phases (colocated, or a decode worker on the decode-only path).
        ``cached_tokens``: of the prompt, what the router's index says ``worker`` caches (not counted as its load)."""
        request_id = attempt_id(req.request_id, attempt)
        trace.path = path
        trace.prefill_worker = trace.decode_worker = worker.worker_id
        cost = max(len(req.prompt_token_ids) - cached_tokens, 0) + req.params.max_tokens * req.n
        worker.charge(cost)
        done = False
        ended: set[int] = set()
        stream = worker.handle.serve.remote(request_id, req.prompt_token_ids, req.params,
                                            progress.token_ids or None, progress.text or None, req.n)
        try:
            async for ev in self._events(worker, stream, CALL_TIMEOUT_S + self.queue_timeout_s):
                match ev:
                    case Ack():
                        trace.prefill_cached_tokens = ev.cached_tokens
                        trace.prefill_queued = trace.decode_queued = ev.t_called
                        trace.prefill_start = ev.t_scheduled if ev.t_scheduled is not None else ev.t_called
                        trace.prefill_end = trace.decode_start = (
                            ev.t_first_token if ev.t_first_token is not None else ev.t_joined)
                    case TokenChunk():
                        if ev.finished:
                            ended.add(ev.index)
                        done = len(ended) == req.n
                        yield _token_event(ev, trace)
                        if done:
                            return
        finally:
            worker.release(cost)
            if not done:
                ray.cancel(stream)
                worker.handle.abort.remote(request_id)

    async def _pick(self, req: ParsedRequest, progress: _Progress, failed: set[str],
                    deadline: float | None) -> tuple[WorkerInfo, int]:
        """The colocated worker for this attempt, and how many of its prompt tokens it caches (by the index)."""
        limit = self._wait_limit(deadline)
        query = PrefixQuery(list(req.prompt_token_ids) + progress.token_ids)
        while True:
            workers = {w.worker_id: w for w in self.directory.of_kind("colocated") if w.worker_id not in failed}
            if workers:
                best = workers[self.decode_policy.rank(self.directory.loads(list(workers.values()), query))[0]]
                return best, self.directory.prefix_index.cached_tokens(best.worker_id, query)
            if time.monotonic() >= limit:
                await self._out_of_capacity(limit, deadline, "no live colocated worker")
            await asyncio.sleep(0.1)

    # ----------------------------------------------------------------- calls
    async def _call(self, worker: WorkerInfo, ref: Any, timeout: float) -> Any:
        """Await one actor call; a dead, failing or stuck worker fails the attempt."""
        try:
            return await within(ref, timeout_s=timeout)
        except InvalidRequestError:
            raise
        except Exception as exc:
            raise AttemptFailed(worker.worker_id, f"{worker.worker_id}: {exc!r}") from exc

    async def _events(self, worker: WorkerInfo, stream: Any, first_timeout: float) -> AsyncIterator[Ack | TokenChunk]:
        """What a worker's streaming call yields; its death, a :class:`WorkerError`
        or a stall (no event within the timeout) fails the attempt."""
        timeout = first_timeout
        while True:
            try:
                ref = await within(stream.__anext__(), timeout_s=timeout)
                ev = await within(ref, timeout_s=CALL_TIMEOUT_S)
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise AttemptFailed(worker.worker_id, f"{worker.worker_id}: {exc!r}") from exc
            match ev:
                case WorkerError():
                    raise _failure(ev, worker.worker_id, worker.worker_id)
                case Ack() | TokenChunk():
                    yield ev
                case _:
                    raise AttemptFailed(worker.worker_id, f"{worker.worker_id}: unexpected event {ev!r}")
            timeout = CALL_TIMEOUT_S
