"""One router, in the launch process or as a replica actor: its settings, how it
is built and started, and the :class:`RouterReplica` actor.

With ``router.replicas: N`` > 1 the deployment runs N :class:`RouterReplica`
actors (``<namespace>/router-<i>``): detached, ``num_cpus=0``, pinned to the
launch's node, ``max_restarts=-1``. Each binds ``router.host:router.port``
with SO_REUSEPORT, so the kernel spreads new connections over the live ones,
and each finds the pool manager by name and routes to any worker, so any of
them serves any request. A replica's death (SIGKILL) ends only the streams it
carried; Ray restarts its process under the same name and it binds the port
again. Replica ``i`` serves ``/metrics`` on ``router.metrics_port + i``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from engine.model_loader import load_tokenizer
from cluster.config import RouterConfig
from observability.metrics import AutoscaleCollector, RouterMetrics, WorkerStatusCollector, start_metrics_server
from router.directory import WorkerDirectory
from router.policy import make_policy
from router.request_runner import ConditionalPrefill, RequestRunner
from router.server import RouterServer, ServingServicer, fetch_limits

log = logging.getLogger(__name__)
ROUTER_NAME_PREFIX = "router-"
FIND_MANAGER_TIMEOUT_S = 120.0  # a replica restarted while the pool manager is restarting too waits for it
READY_TIMEOUT_S = 600.0  # loading the tokenizer on a busy 2-core machine is slow


def router_actor_name(index: int) -> str:
    """Replica ``index``'s actor name in the deployment's namespace."""
    return f"{ROUTER_NAME_PREFIX}{index}"


@dataclass(frozen=True)
class RouterSettings:
    """Everything one router needs: the config's ``router`` section as written, and what the
    deployment resolves around it (``cluster.deployment.router_settings`` fills it)."""

    config: RouterConfig  # router.* (its port and http_port as configured: see ``port``, ``http_port``)
    model_name: str
    transfer_timeout_s: float  # kvtransfer.timeout_s
    colocated: bool
    namespace: str
    pool_manager_name: str
    tls: tuple[str, str] | None  # absolute (cert, key) paths: a replica's working directory is not the launch's
    token: str | None
    port: int  # the port every replica binds (config.port, 0 resolved before any replica starts)
    http_port: int | None  # the OpenAI-compatible API's port (None: off; resolved from 0 like ``port``)
    reuse_port: bool = False  # SO_REUSEPORT, explicitly (replicas share the ports)

    def metrics_port_of(self, index: int) -> int | None:
        """Where replica ``index`` serves /metrics: ``router.metrics_port + index`` (0 and None as they are)."""
        base = self.config.metrics_port
        return base + index if base else base


@dataclass(frozen=True)
class RouterStats:
    """What a router reports about itself (crosses the actor boundary)."""

    index: int
    pid: int
    address: str
    metrics_port: int | None
    http_port: int | None  # where its OpenAI-compatible API listens (None: off)
    inflight: int  # requests admitted and not finished
    admitted: int  # requests admitted since this process started
    retries: int  # attempts beyond the first, over all requests
    accepting: bool  # False once draining


class RunningRouter:
    """A started router: the gRPC server, its directory and its /metrics endpoint."""

    def __init__(self, server: RouterServer, metrics_server: Any, metrics_port: int | None) -> None:
        self.server = server
        self.metrics_server = metrics_server
        self.metrics_port = metrics_port

    def stats(self, index: int) -> RouterStats:
        s = self.server.servicer
        return RouterStats(index=index, pid=os.getpid(), address=self.server.address, metrics_port=self.metrics_port,
                           http_port=self.server.http.port if self.server.http is not None else None,
                           inflight=s.inflight, admitted=s.admitted, retries=s.runner.retries,
                           accepting=s.accepting)

    async def stop(self, grace_s: float) -> None:
        """Drain (see :meth:`RouterServer.stop`), then close /metrics."""
        await self.server.stop(grace_s)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None


async def start_router(s: RouterSettings, pool_manager: Any, find_pool_manager: Callable[[], Any],
                       metrics_port: int | None, registry: CollectorRegistry | None = None) -> RunningRouter:
    """Build the router for ``s`` on the pools of ``pool_manager`` and start serving."""
    registry = registry if registry is not None else CollectorRegistry()
    rc = s.config
    tokenizer = await asyncio.to_thread(load_tokenizer, s.model_name)
    directory = WorkerDirectory(pool_manager, find_pool_manager=find_pool_manager)
    await directory.refresh()
    limits = await fetch_limits(directory)
    runner = RequestRunner(directory, make_policy(rc.policy, rc.prefix_cache_weight),
                           make_policy(rc.policy, rc.prefix_cache_weight),
                           transfer_timeout_s=s.transfer_timeout_s, queue_timeout_s=rc.queue_timeout_s,
                           max_attempts=rc.max_attempts, transfer_retries=rc.transfer_retries, colocated=s.colocated,
                           conditional=ConditionalPrefill(rc.conditional_prefill_max_tokens,
                                                          rc.conditional_prefill_min_cached_ratio,
                                                          rc.conditional_prefill_offload_when_idle))
    metrics = RouterMetrics(registry)
    registry.register(WorkerStatusCollector(
        lambda: [w.status for w in list(directory.workers.values()) if w.status is not None]))
    registry.register(AutoscaleCollector(lambda: directory.autoscale))
    servicer = ServingServicer(runner, directory, tokenizer, limits, rc.max_queued, metrics,
                               request_timeout_s=rc.request_timeout_s)
    server = RouterServer(servicer, rc.host, s.port, tls=s.tls, token=s.token,
                          max_request_bytes=rc.max_request_bytes, reuse_port=s.reuse_port, http_port=s.http_port)
    await server.start()
    metrics_server, bound = None, None
    if metrics_port is not None:
        metrics_server, bound = start_metrics_server(registry, rc.metrics_host, metrics_port)
    return RunningRouter(server, metrics_server, bound)


class RouterReplica:
    """Plain class; launched with ``ray.remote(RouterReplica).options(name=router_actor_name(i),
    lifetime="detached", num_cpus=0, max_restarts=-1, ...)``.

    The constructor starts the router on an event loop of its own thread and
    returns once it serves, so a Ray restart (which runs only the constructor)
    brings a dead replica back serving. Methods are plain and quick; the actor
    is threaded (``max_concurrency``) so that :meth:`stats` answers during a drain.
    """

    def __init__(self, index: int, settings: RouterSettings) -> None:
        import ray

        self.index = index
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"router-{index}", daemon=True)
        self._thread.start()

        def find() -> Any:
            return ray.get_actor(settings.pool_manager_name, namespace=settings.namespace)

        async def start() -> RunningRouter:
            deadline = time.monotonic() + FIND_MANAGER_TIMEOUT_S
            while True:
                try:
                    manager = await asyncio.to_thread(find)
                    return await start_router(settings, manager, find, settings.metrics_port_of(index))
                except Exception as e:
                    # The pool manager may be restarting (it died with us, or Ray is bringing it back).
                    if time.monotonic() > deadline:
                        raise
                    log.warning("router %d cannot start yet (%s); retrying", index, e)
                    await asyncio.sleep(1.0)

        self._router = asyncio.run_coroutine_threadsafe(start(), self._loop).result(READY_TIMEOUT_S)
        log.info("router replica %d serving on %s", index, self._router.server.address)

    def ready(self) -> RouterStats:
        """Answers once the constructor has returned, that is once this replica serves."""
        return self.stats()

    def stats(self) -> RouterStats:
        return self._router.stats(self.index)

    def pid(self) -> int:
        return os.getpid()

    def drain(self, grace_s: float) -> RouterStats:
        """Stop admitting, let in-flight requests finish for up to ``grace_s``, stop serving."""
        asyncio.run_coroutine_threadsafe(self._router.stop(grace_s), self._loop).result(grace_s + 30)
        return self.stats()
