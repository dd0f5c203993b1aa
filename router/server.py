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
from contextlib import aclosing

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from observability.metrics import RouterMetrics
from protos import serving_pb2
from router.directory import STATUS_TIMEOUT_S, WorkerDirectory
from router.openai_http import OpenAIServer
from router.lifecycle import (DeadlineExceeded, Refusal, RequestLifecycle, RequestRefused, fill_logprobs,
                              fill_timings, request_deadline, until)
from router.request_decoding import WireError, make_request_deserializer
from router.request_runner import RequestRunner, RequestTrace
from router.security import add_port, auth_interceptors
from worker_common.messages import ModelLimits
from worker_common.timeouts import within

__all__ = ["DeadlineExceeded", "RouterServer", "ServingServicer", "fill_timings", "request_deadline", "until"]

log = logging.getLogger(__name__)
SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
FINISH = {
    "stop": serving_pb2.FINISH_REASON_STOP,
    "length": serving_pb2.FINISH_REASON_LENGTH,
    "abort": serving_pb2.FINISH_REASON_ABORT,
}
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
HEALTH_INTERVAL_S = 0.25
# The gRPC status of each way a request can fail (docs/architecture.md, "Errors").
GRPC_STATUS = {
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Refusal.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.NO_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.DRAINING: grpc.StatusCode.UNAVAILABLE,
    Refusal.FAILED: grpc.StatusCode.UNAVAILABLE,
    Refusal.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Refusal.INTERNAL: grpc.StatusCode.INTERNAL,
}


class ServingServicer:
    """The ``Serving`` service (see protos/serving.proto); registered by :class:`RouterServer`.

    Admission, tokenizing and running go through :attr:`lifecycle`, which the
    HTTP server (``router/openai_http.py``) shares."""

    def __init__(self, runner: RequestRunner, directory: WorkerDirectory, tokenizer, limits: ModelLimits,
                 max_queued: int, metrics: RouterMetrics | None = None, *,
                 request_timeout_s: float | None = None) -> None:
        """``request_timeout_s``: the longest a request may run in the router (None: no limit)."""
        self.runner = runner
        self.directory = directory
        self.limits = limits
        self.metrics = metrics
        self.lifecycle = RequestLifecycle(runner, tokenizer, limits, max_queued, metrics,
                                          request_timeout_s=request_timeout_s)

    # What tests and RouterServer read: the lifecycle's state, under the names they always had.
    tokenizer = property(lambda self: self.lifecycle.tokenizer)
    inflight = property(lambda self: self.lifecycle.inflight)
    admitted = property(lambda self: self.lifecycle.admitted)
    max_queued = property(lambda self: self.lifecycle.max_queued)

    @property
    def accepting(self) -> bool:
        return self.lifecycle.accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self.lifecycle.accepting = value

    def close(self) -> None:
        """Stop the tokenizing thread (after the server stopped)."""
        self.lifecycle.close()

    async def Generate(self, request, context):
        trace = RequestTrace()
        life = self.lifecycle
        try:
            if isinstance(request, WireError):
                refusal = Refusal.TOO_LARGE if request.code == grpc.StatusCode.RESOURCE_EXHAUSTED else Refusal.INVALID
                raise life.refuse(refusal, request.message(), request.field)
            life.check([request])
            request.request_id = request.request_id or uuid.uuid4().hex
            with life.holding([request.request_id]):
                parsed = await life.parse(request)
                async with aclosing(life.run(parsed, trace, context.time_remaining())) as events:
                    async for ev in events:
                        resp = serving_pb2.GenerateResponse(request_id=parsed.request_id, token_ids=ev.token_ids,
                                                            text=ev.text)
                        fill_logprobs(resp, ev.logprobs)
                        if ev.finished:
                            resp.finish_reason = FINISH.get(ev.finish_reason, serving_pb2.FINISH_REASON_UNSPECIFIED)
                            resp.usage.prompt_tokens = len(parsed.prompt_token_ids)
                            resp.usage.completion_tokens = trace.num_output_tokens
                            fill_timings(resp.timings, trace)
                        yield resp
        except RequestRefused as e:
            await context.abort(GRPC_STATUS[e.refusal], str(e))

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
    ``http_port`` (None: off) also serves the OpenAI-compatible HTTP API
    (:mod:`router.openai_http`) on ``host``, through the same request
    lifecycle, token and TLS; it drains and stops with the gRPC server.
    """

    def __init__(self, servicer: ServingServicer, host: str, port: int, *, tls: tuple[str, str] | None = None,
                 token: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 reuse_port: bool = False, http_port: int | None = None) -> None:
        self.servicer = servicer
        self.http: OpenAIServer | None = None
        if http_port is not None:
            self.http = OpenAIServer(servicer.lifecycle, self.can_serve, host, http_port, tls=tls, token=token,
                                     max_request_bytes=max_request_bytes, reuse_port=reuse_port)
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
        if self.http is not None:
            await self.http.start()
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
        if self.http is not None:
            await self.http.stop()
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
    return await within(workers[0].handle.limits.remote(), timeout_s=STATUS_TIMEOUT_S)
