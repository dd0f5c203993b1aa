"""The client-facing gRPC server (``grpc.aio``): Generate, ClusterStatus,
the standard health service and server reflection; TLS and bearer-token
authentication when configured.

Errors map to gRPC statuses, each message naming the field or the limit:
bad input (including undecodable bytes and invalid UTF-8) →
INVALID_ARGUMENT; another model → NOT_FOUND; too large a request, too many
requests in flight, or no KV room in time → RESOURCE_EXHAUSTED; shutting
down or every attempt failed → UNAVAILABLE; a request the engine failed on
its own (not retried) → INTERNAL, with the engine's message; a request_id
already in flight → ALREADY_EXISTS; a missing or wrong token → UNAUTHENTICATED. A client cancel or an expired deadline ends the request
(CANCELLED / DEADLINE_EXCEEDED) and frees its KV blocks on both workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.sampling_params import InvalidRequestError
from observability.metrics import RouterMetrics
from observability.stages import TIMINGS_FIELDS, Timeline, stage_seconds
from protos import serving_pb2
from router.directory import STATUS_TIMEOUT_S, WorkerDirectory
from router.request_runner import (NoCapacityError, RequestFailedError, RequestRunner, RequestTrace,
                                   WorkerFailedError)
from router.request_decoding import WireError, make_request_deserializer
from router.security import add_port, auth_interceptors
from router.validation import check_limits, parse_request
from worker_common.messages import ModelLimits

log = logging.getLogger(__name__)
SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
FINISH = {
    "stop": serving_pb2.FINISH_REASON_STOP,
    "length": serving_pb2.FINISH_REASON_LENGTH,
    "abort": serving_pb2.FINISH_REASON_ABORT,
}
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
HEALTH_INTERVAL_S = 0.25
T = TypeVar("T")


class ServingServicer:
    """The ``Serving`` service (see protos/serving.proto); registered by :class:`RouterServer`."""

    def __init__(self, runner: RequestRunner, directory: WorkerDirectory, tokenizer, limits: ModelLimits,
                 max_queued: int, metrics: RouterMetrics | None = None, *,
                 request_timeout_s: float | None = None) -> None:
        """``request_timeout_s``: the longest a request may run in the router (None: no limit)."""
        self.runner = runner
        self.request_timeout_s = request_timeout_s
        self.directory = directory
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_queued = max_queued
        self.metrics = metrics
        self.inflight = 0
        self.admitted = 0  # requests admitted since start (tests and the soak tell replicas apart by it)
        self.active_ids: set[str] = set()  # request ids in flight: a second one with the same id is refused
        self.accepting = True
        # One thread tokenizes, off the event loop (a fast tokenizer is not
        # safe to call from several threads at once); inputs are bounded by
        # router.validation.LIMITS and each waiting request counts against max_queued.
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    def close(self) -> None:
        """Stop the tokenizing thread (after the server stopped)."""
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def _refuse(self, context, code: grpc.StatusCode, message: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count_outcome(outcome)
        await context.abort(code, message)

    async def Generate(self, request, context):
        trace = RequestTrace()
        if isinstance(request, WireError):
            outcome = "rejected" if request.code == grpc.StatusCode.RESOURCE_EXHAUSTED else "invalid"
            await self._refuse(context, request.code, request.message(), outcome)
        if not self.accepting:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, "the router is shutting down", "rejected")
        try:
            check_limits(request)  # cheap, and before anything is parsed further
        except InvalidRequestError as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid")
        if request.model and request.model != self.limits.name:
            await self._refuse(context, grpc.StatusCode.NOT_FOUND,
                               f"model: {request.model!r} is not served here; this cluster serves {self.limits.name!r}",
                               "invalid")
        if self.inflight >= self.max_queued:  # before tokenizing: a refused request costs nothing
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"router.max_queued: {self.max_queued} requests already in flight; retry later",
                               "rejected")
        if request.request_id in self.active_ids:
            await self._refuse(context, grpc.StatusCode.ALREADY_EXISTS,
                               f"request_id: {request.request_id!r} is already in flight; ids must be unique "
                               "among in-flight requests", "rejected")
        request.request_id = request.request_id or uuid.uuid4().hex
        # From here the request counts against max_queued and holds its id,
        # tokenizing included: that is the one costly step of admission.
        self.inflight += 1
        self.admitted += 1
        self.active_ids.add(request.request_id)
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            async for resp in self._admitted(request, context, trace):
                yield resp
        finally:
            self.inflight -= 1
            self.active_ids.discard(request.request_id)
            if self.metrics is not None:
                self.metrics.in_flight.dec()

    async def _admitted(self, request, context, trace: RequestTrace):
        """Tokenize (on the tokenizing thread, so streams and health checks go on) and run."""
        try:
            parsed = await asyncio.get_running_loop().run_in_executor(
                self._tokenizing, parse_request, request, self.tokenizer, self.limits)
        except InvalidRequestError as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid")
        trace.admitted = time.time()
        deadline, why = request_deadline(context.time_remaining(), self.request_timeout_s)
        outcome = "error"
        try:
            async with aclosing(self.runner.run(parsed, trace, deadline)) as events:
                async for ev in until(events, deadline):
                    resp = serving_pb2.GenerateResponse(request_id=parsed.request_id, token_ids=ev.token_ids, text=ev.text)
                    if ev.finished:
                        trace.finished = time.time()
                        resp.finish_reason = FINISH.get(ev.finish_reason, serving_pb2.FINISH_REASON_UNSPECIFIED)
                        resp.usage.prompt_tokens = len(parsed.prompt_token_ids)
                        resp.usage.completion_tokens = trace.num_output_tokens
                        fill_timings(resp.timings, trace)
                        outcome = "ok"
                    yield resp
        except asyncio.CancelledError:
            left = context.time_remaining()
            outcome = "deadline" if left is not None and left <= 0 else "cancelled"
            raise
        except DeadlineExceeded:  # the runner's cleanup has run: both workers were told to drop the request
            outcome = "deadline"
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, why)
        except InvalidRequestError as e:
            outcome = "invalid"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NoCapacityError as e:
            outcome = "rejected"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except WorkerFailedError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except RequestFailedError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            self._observe(outcome, parsed, trace)

    def _observe(self, outcome: str, parsed, trace: RequestTrace) -> None:
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

    async def ClusterStatus(self, request, context):
        await self.directory.poll_status()
        resp = serving_pb2.ClusterStatusResponse(model=self.limits.name)
        kinds = ("colocated",) if self.runner.colocated else ("prefill", "decode")
        for kind in kinds:
            pool = resp.pools.add(kind=kind, target_replicas=self.directory.targets.get(kind, 0))
            for w in sorted(self.directory.of_kind(kind), key=lambda w: w.worker_id):
                pb = pool.workers.add(worker_id=w.worker_id, node_id=w.node_id, alive=w.alive)
                if (s := w.status) is not None:  # never answered a poll: the rest stays 0
                    pb.running, pb.waiting = s.running, s.waiting
                    pb.outstanding_tokens = max(s.outstanding_tokens, 0)
                    pb.free_blocks, pb.used_blocks, pb.num_blocks = s.free_blocks, s.used_blocks, s.num_blocks
                    pb.requests_served, pb.tokens_generated = s.requests_served, s.tokens_processed
                    c = s.prefix_cache
                    pb.cached_blocks, pb.cache_evictions = c.cached_blocks, c.evictions
                    pb.prefix_queried_tokens, pb.prefix_hit_tokens = c.queried_tokens, c.hit_tokens
        return resp


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


class RouterServer:
    """Owns the grpc.aio server, its health status and the directory refresh.

    Health is SERVING while the router admits requests and the directory
    knows a live worker of each kind a request needs; NOT_SERVING otherwise
    (no live prefill or decode worker, or shutting down).

    ``tls`` is ``(cert_path, key_path)`` to serve TLS; ``token`` turns on
    bearer-token authentication (health checks and reflection stay open).
    ``reuse_port``: bind with SO_REUSEPORT (``grpc.so_reuseport``), so that
    router replicas in other processes serve the same port; the kernel spreads
    new connections over them. gRPC does this by default on Linux; replicas
    ask for it explicitly.
    """

    def __init__(self, servicer: ServingServicer, host: str, port: int, *, tls: tuple[str, str] | None = None,
                 token: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 reuse_port: bool = False) -> None:
        self.servicer = servicer
        # gRPC's own limit sits above ours, so that our deserializer can name the limit in its error.
        options = [("grpc.max_receive_message_length", max_request_bytes * 2 + 1024)]
        if reuse_port:
            options.append(("grpc.so_reuseport", 1))
        self.server = grpc.aio.server(interceptors=auth_interceptors(token), options=options)
        self.server.add_generic_rpc_handlers((serving_handlers(servicer, max_request_bytes),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        cert, key = tls if tls is not None else (None, None)
        self.port = add_port(self.server, f"{host}:{port}", cert_path=cert, key_path=key)
        if self.port == 0:
            raise RuntimeError(f"router.port: cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.servicer.directory.refresh()
        self.servicer.directory.start()
        await self.server.start()
        await self.update_health()
        self._health_task = asyncio.get_running_loop().create_task(self._watch_health())

    def can_serve(self) -> bool:
        """Whether a request could be served now: admitting, and a live worker of
        each kind a request needs (a prefill and a decode worker; colocated: one replica)."""
        directory = self.servicer.directory
        kinds = ("colocated",) if self.servicer.runner.colocated else ("prefill", "decode")
        return self.servicer.accepting and all(any(w.alive for w in directory.of_kind(k)) for k in kinds)

    async def update_health(self) -> None:
        """Set the health service's status (both the server's and the Serving service's) from :meth:`can_serve`."""
        status = (health_pb2.HealthCheckResponse.SERVING if self.can_serve()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        # The directory polls every worker's status every refresh_s: follow it.
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self.update_health()
            except Exception:
                log.exception("updating the health status failed")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop admitting (health NOT_SERVING, new calls UNAVAILABLE), let in-flight ones finish
        for up to ``grace_s``, then cancel the rest (their KV is freed on both sides)."""
        self.servicer.accepting = False
        if self._health_task is not None:
            self._health_task.cancel()
        await self.update_health()
        deadline = time.monotonic() + grace_s
        while self.servicer.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(grace=1.0)
        self.servicer.directory.stop()
        self.servicer.close()


def serving_handlers(servicer: ServingServicer, max_request_bytes: int) -> grpc.GenericRpcHandler:
    """The ``Serving`` methods, with :mod:`router.request_decoding`'s deserializer for Generate
    (the generated ``add_ServingServicer_to_server`` would answer bad bytes with INTERNAL)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=make_request_deserializer(max_request_bytes),
            response_serializer=serving_pb2.GenerateResponse.SerializeToString),
        "ClusterStatus": grpc.unary_unary_rpc_method_handler(
            servicer.ClusterStatus, request_deserializer=serving_pb2.ClusterStatusRequest.FromString,
            response_serializer=serving_pb2.ClusterStatusResponse.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


async def fetch_limits(directory: WorkerDirectory) -> ModelLimits:
    """Ask one worker which model it serves and its limits."""
    workers = list(directory.workers.values())
    if not workers:
        raise RuntimeError("no workers to ask for the model's limits")
    return await asyncio.wait_for(workers[0].handle.limits.remote(), timeout=STATUS_TIMEOUT_S)
