"""The client-facing gRPC server (``grpc.aio``): Generate, ClusterStatus,
the standard health service and server reflection.

Errors map to gRPC statuses: bad input → INVALID_ARGUMENT naming the field;
another model → NOT_FOUND; full queue or no KV room in time →
RESOURCE_EXHAUSTED; a failed worker or transfer → UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.sampling_params import InvalidRequestError
from protos import serving_pb2, serving_pb2_grpc
from router.directory import STATUS_TIMEOUT_S, WorkerDirectory
from router.lifecycle import NoCapacityError, RequestRunner, RequestTimings, WorkerFailedError
from router.validation import ModelLimits, parse_request

log = logging.getLogger(__name__)
SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
FINISH = {
    "stop": serving_pb2.FINISH_REASON_STOP,
    "length": serving_pb2.FINISH_REASON_LENGTH,
    "abort": serving_pb2.FINISH_REASON_ABORT,
}


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, runner: RequestRunner, directory: WorkerDirectory, tokenizer, limits: ModelLimits,
                 max_queued: int) -> None:
        self.runner = runner
        self.directory = directory
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_queued = max_queued
        self.inflight = 0
        self.accepting = True

    async def Generate(self, request, context):
        timings = RequestTimings()
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is shutting down")
        if request.model and request.model != self.limits.name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: {request.model!r} is not served here; this cluster serves {self.limits.name!r}")
        try:
            parsed = parse_request(request, self.tokenizer, self.limits)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.inflight >= self.max_queued:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"router.max_queued: {self.max_queued} requests already in flight")
        self.inflight += 1
        try:
            async for ev in self.runner.run(parsed, timings):
                resp = serving_pb2.GenerateResponse(request_id=parsed.request_id, token_ids=ev.token_ids, text=ev.text)
                if ev.finished:
                    resp.finish_reason = FINISH.get(ev.finish_reason, serving_pb2.FINISH_REASON_UNSPECIFIED)
                    resp.usage.prompt_tokens = len(parsed.prompt_token_ids)
                    resp.usage.completion_tokens = timings.num_output_tokens
                    fill_timings(resp.timings, timings)
                yield resp
        except NoCapacityError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except WorkerFailedError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self.inflight -= 1

    async def ClusterStatus(self, request, context):
        await self.directory.poll_status()
        resp = serving_pb2.ClusterStatusResponse(model=self.limits.name)
        for kind in ("prefill", "decode"):
            pool = resp.pools.add(kind=kind, target_replicas=self.directory.targets.get(kind, 0))
            for w in sorted(self.directory.of_kind(kind), key=lambda w: w.worker_id):
                s = w.status
                pool.workers.add(
                    worker_id=w.worker_id, node_id=w.node_id, alive=bool(s.get("alive", False)),
                    running=s.get("running", 0), waiting=s.get("waiting", 0),
                    outstanding_tokens=max(s.get("outstanding_tokens", 0), 0), free_blocks=s.get("free_blocks", 0),
                    used_blocks=s.get("used_blocks", 0), num_blocks=s.get("num_blocks", 0),
                    requests_served=s.get("requests_served", 0),
                    tokens_generated=s.get("tokens_generated", s.get("tokens_prefilled", 0)),
                )
        return resp


def fill_timings(pb, t: RequestTimings) -> None:
    ms = 1000.0
    pb.ttft_ms = (t.first_token - t.received) * ms if t.first_token else 0.0
    pb.e2e_ms = (t.finished or time.perf_counter()) * ms - t.received * ms
    if t.num_output_tokens > 1 and t.first_token:
        pb.tpot_ms = ((t.finished or time.perf_counter()) - t.first_token) * ms / (t.num_output_tokens - 1)
    pb.queue_ms = (t.reserved - t.received) * ms if t.reserved else 0.0
    pb.prefill_ms = t.prefill_ms
    pb.transfer_ms = t.transfer_ms
    pb.transfer_bytes = t.transfer_bytes
    pb.prefill_worker = t.prefill_worker
    pb.decode_worker = t.decode_worker


class RouterServer:
    """Owns the grpc.aio server, its health status and the directory refresh."""

    def __init__(self, servicer: ServingServicer, host: str, port: int) -> None:
        self.servicer = servicer
        self.server = grpc.aio.server()
        serving_pb2_grpc.add_ServingServicer_to_server(servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"router.port: cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"

    async def start(self) -> None:
        await self.servicer.directory.refresh()
        self.servicer.directory.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop admitting (health NOT_SERVING, new calls UNAVAILABLE), let in-flight ones finish."""
        self.servicer.accepting = False
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace_s
        while self.servicer.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(grace=1.0)
        self.servicer.directory.stop()


async def fetch_limits(directory: WorkerDirectory) -> ModelLimits:
    """Ask one worker which model it serves and its limits."""
    workers = directory.of_kind("decode") + directory.of_kind("prefill")
    if not workers:
        raise RuntimeError("no workers to ask for the model's limits")
    lim = await asyncio.wait_for(workers[0].handle.limits.remote(), timeout=STATUS_TIMEOUT_S)
    return ModelLimits(**lim)
