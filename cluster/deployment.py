"""A running deployment: the pool manager actor plus the router server.

``Deployment`` is what ``cluster.launch`` serves and what the integration
tests start; it is the only code that reads the whole config tree and turns
it into the explicit arguments of the pool manager, workers and router.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import ray

from prometheus_client import CollectorRegistry

from cluster.config import ClusterConfig
from cluster.pool_manager import PoolManager, PoolSpec
from engine.model_loader import load_tokenizer
from observability.metrics import RouterMetrics, WorkerStatusCollector, start_metrics_server
from router.directory import WorkerDirectory
from router.lifecycle import RequestRunner
from router.policy import make_policy
from router.security import load_secret
from router.server import RouterServer, ServingServicer, fetch_limits

log = logging.getLogger(__name__)
POOL_MANAGER_NAME = "pool_manager"


def pool_specs(cfg: ClusterConfig, kv_secret: str | None = None,
               transport_extra: dict[str, Any] | None = None) -> list[PoolSpec]:
    """Worker constructor arguments and Ray resources of each pool: prefill and
    decode, or the one colocated pool. ``transport_extra`` adds transport
    constructor arguments (tests pass fault injection this way)."""
    kv = cfg.kvtransfer
    # Ray's backend finds its peers by actor name; the others by address.
    transport: dict[str, Any] = ({"namespace": cfg.ray.namespace} if kv.backend == "ray"
                                 else {"host": kv.host, "chunk_bytes": kv.chunk_bytes})
    if kv.backend == "grpc":
        transport.update(stream_idle_s=kv.stream_idle_s, max_streams_per_peer=kv.max_streams_per_peer)
    if kv_secret is not None:
        transport["secret"] = kv_secret
    transport.update(transport_extra or {})
    model = {"model": cfg.model.name, "dtype": cfg.model.dtype, "max_model_len": cfg.model.max_model_len}
    p, d = cfg.pools.prefill, cfg.pools.decode
    decode_kwargs = {**model, "block_size": d.block_size, "num_blocks": d.num_blocks,
                     "kv_cache_bytes": d.kv_cache_bytes, "max_running": d.max_running,
                     "max_batched_tokens": d.max_batched_tokens, "lease_s": d.lease_s,
                     "transport_backend": kv.backend, "transport_kwargs": transport}
    if cfg.pools.mode == "colocated":
        return [PoolSpec(kind="colocated", worker_kwargs=decode_kwargs, num_cpus=d.num_cpus, num_gpus=d.num_gpus,
                         resources=dict(d.resources))]
    prefill = PoolSpec(
        kind="prefill",
        worker_kwargs={**model, "block_size": p.block_size, "num_blocks": p.num_blocks, "max_running": p.max_running,
                       "max_batch_tokens": p.max_batch_tokens, "batch_wait_ms": p.batch_wait_ms,
                       "hold_lease_s": d.lease_s, "transport_backend": kv.backend, "transport_kwargs": transport},
        num_cpus=p.num_cpus, num_gpus=p.num_gpus, resources=dict(p.resources),
    )
    decode = PoolSpec(kind="decode", worker_kwargs=decode_kwargs, num_cpus=d.num_cpus, num_gpus=d.num_gpus,
                      resources=dict(d.resources))
    return [prefill, decode]


class Deployment:
    """Pools + router (+ metrics endpoint) for one config, driven from the current event loop.

    ``transport_extra``: extra KV transport constructor arguments for every
    worker (fault injection in tests).
    """

    def __init__(self, cfg: ClusterConfig, transport_extra: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.transport_extra = transport_extra
        self.pool_manager: Any = None
        self.router: RouterServer | None = None
        self.registry = CollectorRegistry()
        self.metrics_server: Any = None
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        assert self.router is not None, "not started"
        return self.router.address

    async def start(self) -> str:
        cfg, rc = self.cfg, self.cfg.router
        # Secrets are read here, once; a missing one stops the launch with its source named.
        token = load_secret(env=rc.auth_token_env, file=rc.auth_token_file)
        kv_secret = load_secret(env=cfg.kvtransfer.secret_env, file=cfg.kvtransfer.secret_file)
        specs = pool_specs(cfg, kv_secret, self.transport_extra)
        colocated = cfg.pools.mode == "colocated"
        ratio = (1,) if colocated else cfg.pools.ratio_pair()
        self.pool_manager = ray.remote(PoolManager).options(
            name=POOL_MANAGER_NAME, namespace=cfg.ray.namespace, num_cpus=0, max_concurrency=64,
        ).remote(specs, ratio, namespace=cfg.ray.namespace)
        p_count, d_count = cfg.pools.counts()
        counts = (d_count,) if colocated else (p_count, d_count)
        await self.pool_manager.start.remote(*counts)
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model.name)
        directory = WorkerDirectory(self.pool_manager)
        await directory.refresh()
        limits = await fetch_limits(directory)
        runner = RequestRunner(directory, make_policy(rc.policy), make_policy(rc.policy),
                               transfer_timeout_s=cfg.kvtransfer.timeout_s,
                               queue_timeout_s=min(rc.request_timeout_s, rc.queue_timeout_s),
                               max_attempts=rc.max_attempts, transfer_retries=rc.transfer_retries,
                               colocated=colocated)
        metrics = RouterMetrics(self.registry)
        self.registry.register(WorkerStatusCollector(
            lambda: [w.status for w in list(directory.workers.values()) if w.status is not None]))
        servicer = ServingServicer(runner, directory, tokenizer, limits, rc.max_queued, metrics)
        tls = (rc.tls_cert, rc.tls_key) if rc.tls_cert and rc.tls_key else None
        self.router = RouterServer(servicer, rc.host, rc.port, tls=tls, token=token,
                                   max_request_bytes=rc.max_request_bytes)
        await self.router.start()
        if rc.metrics_port is not None:
            self.metrics_server, self.metrics_port = start_metrics_server(self.registry, rc.host, rc.metrics_port)
        log.info("serving %s on %s (metrics on %s)", cfg.model.name, self.router.address, self.metrics_port)
        return self.router.address

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain the router (``router.drain_grace_s`` unless given), then stop every actor."""
        if self.router is not None:
            await self.router.stop(self.cfg.router.drain_grace_s if grace_s is None else grace_s)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self.pool_manager is not None:
            try:
                await asyncio.wait_for(self.pool_manager.stop.remote(), timeout=60)
            finally:
                ray.kill(self.pool_manager)
                self.pool_manager = None


class BackgroundDeployment:
    """A :class:`Deployment` on an event loop of its own thread, for sync callers (tests, CLIs)."""

    def __init__(self, cfg: ClusterConfig, transport_extra: dict[str, Any] | None = None) -> None:
        self.deployment = Deployment(cfg, transport_extra)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="deployment", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, timeout: float = 900) -> str:
        return self.run(self.deployment.start(), timeout)

    def stop(self, timeout: float = 120) -> None:
        """Drain and stop (once; later calls return at once)."""
        if not self.loop.is_running():
            return
        try:
            self.run(self.deployment.stop(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
