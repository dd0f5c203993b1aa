"""One request's life in the router, whatever API it came in by.

The gRPC servicer (``router/server.py``) and the OpenAI-compatible HTTP
server (``router/openai_http.py``) both admit, tokenize, run and account
requests through one :class:`RequestLifecycle`, so both count against the
same ``router.max_queued``, share the in-flight request ids, the tokenizing
thread, the draining flag, the deadline rule and the metrics. A request the
router does not serve fully ends with :class:`RequestRefused`, whose
:class:`Refusal` each API maps to its own status (gRPC code, HTTP status).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from typing import TypeVar

from engine.sampling_params import InvalidRequestError
from observability.metrics import RouterMetrics
from observability.stages import TIMINGS_FIELDS, Timeline, stage_seconds
from protos import serving_pb2
from router.request_runner import NoCapacityError, RequestFailedError, RequestRunner, RequestTrace, WorkerFailedError
from router.validation import ParsedRequest, check_limits, parse_request
from engine.sampler import TokenLogprob
from worker_common.messages import ModelLimits, TokenChunk

T = TypeVar("T")


class Refusal(enum.Enum):
    """Why a request was not served (fully); the value is its metrics outcome label."""

    INVALID = "invalid"  # a bad field (named in the message)
    NOT_FOUND = "not_found"  # another model
    TOO_LARGE = "too_large"  # over router.max_request_bytes
    BUSY = "busy"  # router.max_queued requests already in flight
    NO_CAPACITY = "no_capacity"  # no decode worker had KV room within router.queue_timeout_s
    DUPLICATE = "duplicate"  # a request_id already in flight
    DRAINING = "draining"  # the router is shutting down
    FAILED = "failed"  # every attempt failed
    DEADLINE = "deadline"  # the client's deadline or router.request_timeout_s passed
    INTERNAL = "internal"  # a worker's engine failed this request on its own


# The Prometheus ``outcome`` label of each refusal (observability.metrics' vocabulary).
METRIC_OUTCOME = {
    Refusal.INVALID: "invalid", Refusal.NOT_FOUND: "invalid", Refusal.TOO_LARGE: "rejected",
    Refusal.BUSY: "rejected", Refusal.NO_CAPACITY: "rejected", Refusal.DUPLICATE: "rejected",
    Refusal.DRAINING: "rejected", Refusal.FAILED: "error", Refusal.DEADLINE: "deadline",
    Refusal.INTERNAL: "error",
}


class RequestRefused(Exception):
    """The router refused or could not finish a request; ``field`` names the request field at fault, if any."""

    def __init__(self, refusal: Refusal, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.field = field


class RequestLifecycle:
    """Admission, tokenizing and running, shared by every API of the router.

    ``request_timeout_s``: the longest a request may run in the router (None: no limit).
    """

    def __init__(self, runner: RequestRunner, tokenizer, limits: ModelLimits, max_queued: int,
                 metrics: RouterMetrics | None = None, *, request_timeout_s: float | None = None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_queued = max_queued
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.inflight = 0
        self.admitted = 0  # requests admitted since start (tests and the soak tell router replicas apart by it)
        self.active_ids: set[str] = set()  # request ids in flight: a second one with the same id is refused
        self.accepting = True
        # One thread tokenizes, off the event loop (a fast tokenizer is not
        # safe to call from several threads at once); inputs are bounded by
        # router.validation.LIMITS and each waiting request counts against max_queued.
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    def close(self) -> None:
        """Stop the tokenizing thread (after the servers stopped)."""
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    def refuse(self, refusal: Refusal, message: str, field: str | None = None) -> RequestRefused:
        """Count a refusal before the request ran, and return the exception to raise."""
        if self.metrics is not None:
            self.metrics.count_outcome(METRIC_OUTCOME[refusal])
        return RequestRefused(refusal, message, field)

    def check(self, requests: list[serving_pb2.GenerateRequest], n: int = 1) -> None:
        """The checks that cost nothing, before anything is tokenized, for requests that
        are admitted together, each with ``n`` samples (which count ``n`` times: each is
        a stream to decode): draining, every field within
        :data:`router.validation.LIMITS`, the model, ``router.max_queued``, then
        unique request ids."""
        if not self.accepting:
            raise self.refuse(Refusal.DRAINING, "the router is shutting down")
        for request in requests:
            try:
                check_limits(request)
            except InvalidRequestError as e:
                raise self.refuse(Refusal.INVALID, str(e), e.field) from None
            if request.model and request.model != self.limits.name:
                raise self.refuse(Refusal.NOT_FOUND, f"model: {request.model!r} is not served here; this cluster "
                                  f"serves {self.limits.name!r}", "model")
        if self.inflight + len(requests) * n > self.max_queued:
            raise self.refuse(Refusal.BUSY, f"router.max_queued: {self.max_queued} requests already in flight; "
                              "retry later")
        for request in requests:
            if request.request_id in self.active_ids:
                raise self.refuse(Refusal.DUPLICATE, f"request_id: {request.request_id!r} is already in flight; "
                                  "ids must be unique among in-flight requests", "request_id")

    @contextmanager
    def holding(self, request_ids: list[str], n: int = 1) -> Iterator[None]:
        """While inside, the requests (``n`` samples each) count against ``max_queued``
        and hold their ids (tokenizing included: that is the one costly step of admission)."""
        weight = len(request_ids) * n
        self.inflight += weight
        self.admitted += len(request_ids)
        self.active_ids.update(request_ids)
        if self.metrics is not None:
            self.metrics.in_flight.inc(weight)
        try:
            yield
        finally:
            self.inflight -= weight
            self.active_ids.difference_update(request_ids)
            if self.metrics is not None:
                self.metrics.in_flight.dec(weight)

    async def parse(self, request: serving_pb2.GenerateRequest) -> ParsedRequest:
        """Validate and tokenize on the tokenizing thread (streams and health checks go on meanwhile)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._tokenizing, parse_request, request, self.tokenizer, self.limits)
        except InvalidRequestError as e:
            raise self.refuse(Refusal.INVALID, str(e), e.field) from None

    async def run(self, parsed: ParsedRequest, trace: RequestTrace,
                  client_left_s: float | None = None) -> AsyncIterator[TokenChunk]:
        """Run an admitted request through the pools; its chunks, the last one ``finished``
        (``parsed.n`` > 1: the chunks of every sample, ``TokenChunk.index`` saying whose;
        the request has ended once each sample's last chunk has come).

        Ends with :class:`RequestRefused` when it cannot finish; a cancel of
        the consumer (client gone) drops it on both workers at once.
        ``trace.finished`` is stamped before the last chunk is yielded.
        """
        trace.admitted = time.time()
        deadline, why = request_deadline(client_left_s, self.request_timeout_s)
        outcome = "error"
        try:
            async with aclosing(self.runner.run(parsed, trace, deadline)) as events:
                ended: set[int] = set()
                async for ev in until(events, deadline):
                    if ev.finished:
                        ended.add(ev.index)
                        if len(ended) == parsed.n:
                            trace.finished = time.time()
                            outcome = "ok"
                    yield ev
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "ok":
                outcome = "deadline" if deadline is not None and time.monotonic() >= deadline else "cancelled"
            raise
        except DeadlineExceeded:  # the runner's cleanup has run: both workers were told to drop the request
            outcome = "deadline"
            raise RequestRefused(Refusal.DEADLINE, why) from None
        except InvalidRequestError as e:
            outcome = "invalid"
            raise RequestRefused(Refusal.INVALID, str(e), e.field) from None
        except NoCapacityError as e:
            outcome = "rejected"
            raise RequestRefused(Refusal.NO_CAPACITY, str(e)) from None
        except WorkerFailedError as e:
            raise RequestRefused(Refusal.FAILED, str(e)) from None
        except RequestFailedError as e:
            raise RequestRefused(Refusal.INTERNAL, str(e)) from None
        finally:
            self._observe(outcome, parsed, trace)

    def _observe(self, outcome: str, parsed: ParsedRequest, trace: RequestTrace) -> None:
        if self.metrics is None:
            return
        finished = trace.finished or time.time()
        self.metrics.observe_request(
            outcome, num_prompt_tokens=len(parsed.prompt_token_ids), num_output_tokens=trace.num_output_tokens,
            ttft_s=(trace.first_token - trace.received) if trace.first_token else None,
            e2e_s=finished - trace.received, stages=stage_seconds(trace))
        times = trace.token_times
        for a, b in zip(times, times[1:]):
            if b > a:  # tokens of one chunk share a stamp: that is not a gap
                self.metrics.observe_token_gap(b - a)


def request_deadline(client_left_s: float | None, request_timeout_s: float | None) -> tuple[float | None, str]:
    """(``time.monotonic()`` deadline or None, what to tell the client when it passes):
    ``router.request_timeout_s`` from now, or the client's own deadline if sooner."""
    if client_left_s is not None and (request_timeout_s is None or client_left_s < request_timeout_s):
        return time.monotonic() + client_left_s, "the client's deadline passed"
    if request_timeout_s is not None:
        return (time.monotonic() + request_timeout_s,
                f"router.request_timeout_s: the request ran longer than {request_timeout_s:g} s")
    return None, ""


class DeadlineExceeded(Exception):
    """A request ran past its deadline (DEADLINE_EXCEEDED)."""


async def until(events: AsyncIterator[T], deadline: float | None) -> AsyncIterator[T]:
    """``events`` until ``deadline`` (``time.monotonic()``), then :class:`DeadlineExceeded`.

    Only the wait for the next event is bounded, never the consumer's work
    between events: the expiry cancels ``events`` where it waits (so its own
    cleanup runs) and nothing else.
    """
    while True:
        # The event loop's clock is time.monotonic(), so the deadline carries over as is.
        try:
            async with asyncio.timeout_at(deadline):
                ev = await anext(events)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded from None
        yield ev


def fill_timings(pb: serving_pb2.Timings, t: RequestTrace) -> None:
    """The final response's timings and timeline, from the request's trace."""
    ms = 1000.0
    end = t.finished or time.time()
    pb.ttft_ms = (t.first_token - t.received) * ms if t.first_token else 0.0
    pb.e2e_ms = (end - t.received) * ms
    if t.num_output_tokens > 1 and t.first_token:
        pb.tpot_ms = (end - t.first_token) * ms / (t.num_output_tokens - 1)
    stages = stage_seconds(t)
    for stage, name in TIMINGS_FIELDS.items():
        setattr(pb, name, stages.get(stage, 0.0) * ms)
    if stages:
        pb.slowest_stage = max(stages, key=stages.get).value
    pb.transfer_bytes = t.transfer_bytes
    pb.prefill_cached_tokens, pb.decode_cached_tokens = t.prefill_cached_tokens, t.decode_cached_tokens
    pb.transfer_bytes_saved = t.transfer_bytes_saved
    pb.path = t.path.value if t.path is not None else ""
    pb.prefill_worker = t.prefill_worker
    pb.decode_worker = t.decode_worker
    pb.attempts = t.attempts
    # Each stamp as an offset from receipt (0: not reached); a request still running ends now.
    for name in Timeline.stamp_names():
        stamp = end if name == "finished" else getattr(t, name)
        setattr(pb.timeline, f"{name}_ms", (stamp - t.received) * ms if stamp else 0.0)
    pb.timeline.token_ms.extend((x - t.received) * ms for x in t.token_times)


def fill_logprobs(resp: serving_pb2.GenerateResponse, logprobs: tuple[TokenLogprob, ...]) -> None:
    """A response's per-token log-probabilities, from a worker's chunk."""
    for lp in logprobs:
        pb = resp.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
        for token_id, logprob in lp.top:
            pb.top.add(token_id=token_id, logprob=logprob)
