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

from cluster.config import ClusterConfig
from cluster.pool_manager import PoolManager, PoolSpec
from engine.model_loader import load_tokenizer
from router.directory import WorkerDirectory
from router.lifecycle import RequestRunner
from router.policy import make_policy
from router.server import RouterServer, ServingServicer, fetch_limits

log = logging.getLogger(__name__)
POOL_MANAGER_NAME = "pool_manager"


def pool_specs(cfg: ClusterConfig) -> tuple[PoolSpec, PoolSpec]:
    """Worker constructor arguments and Ray resources of both pools."""
    kv = cfg.kvtransfer
    # Ray's backend finds its peers by actor name; the others by address.
    transport = ({"namespace": cfg.ray.namespace} if kv.backend == "ray"
                 else {"host": kv.host, "chunk_bytes": kv.chunk_bytes})
    model = {"model": cfg.model.name, "dtype": cfg.model.dtype, "max_model_len": cfg.model.max_model_len}
    p, d = cfg.pools.prefill, cfg.pools.decode
    prefill = PoolSpec(
        kind="prefill",
        worker_kwargs={**model, "block_size": p.block_size, "num_blocks": p.num_blocks, "max_running": p.max_running,
                       "max_batch_tokens": p.max_batch_tokens, "batch_wait_ms": p.batch_wait_ms,
                       "hold_lease_s": d.lease_s, "transport_backend": kv.backend, "transport_kwargs": transport},
        num_cpus=p.num_cpus, num_gpus=p.num_gpus, resources=dict(p.resources),
    )
    decode = PoolSpec(
        kind="decode",
        worker_kwargs={**model, "block_size": d.block_size, "num_blocks": d.num_blocks,
                       "kv_cache_bytes": d.kv_cache_bytes, "max_running": d.max_running,
                       "max_batched_tokens": d.max_batched_tokens, "lease_s": d.lease_s,
                       "transport_backend": kv.backend, "transport_kwargs": transport},
        num_cpus=d.num_cpus, num_gpus=d.num_gpus, resources=dict(d.resources),
    )
    return prefill, decode


class Deployment:
    """Pools + router for one config, driven from the current event loop."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.pool_manager: Any = None
        self.router: RouterServer | None = None

    @property
    def address(self) -> str:
        assert self.router is not None, "not started"
        return self.router.address

    async def start(self) -> str:
        cfg = self.cfg
        prefill, decode = pool_specs(cfg)
        self.pool_manager = ray.remote(PoolManager).options(
            name=POOL_MANAGER_NAME, namespace=cfg.ray.namespace, num_cpus=0, max_concurrency=64,
        ).remote(prefill, decode, cfg.pools.ratio_pair(), namespace=cfg.ray.namespace)
        p_count, d_count = cfg.pools.counts()
        await self.pool_manager.start.remote(p_count, d_count)
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model.name)
        directory = WorkerDirectory(self.pool_manager)
        await directory.refresh()
        limits = await fetch_limits(directory)
        runner = RequestRunner(directory, make_policy(cfg.router.policy), make_policy(cfg.router.policy),
                               transfer_timeout_s=cfg.kvtransfer.timeout_s,
                               queue_timeout_s=min(cfg.router.request_timeout_s, 30.0))
        servicer = ServingServicer(runner, directory, tokenizer, limits, cfg.router.max_queued)
        self.router = RouterServer(servicer, cfg.router.host, cfg.router.port)
        await self.router.start()
        log.info("serving %s on %s", cfg.model.name, self.router.address)
        return self.router.address

    async def stop(self, grace_s: float = 10.0) -> None:
        """Drain the router, then stop every actor."""
        if self.router is not None:
            await self.router.stop(grace_s)
        if self.pool_manager is not None:
            try:
                await asyncio.wait_for(self.pool_manager.stop.remote(), timeout=60)
            finally:
                ray.kill(self.pool_manager)
                self.pool_manager = None


class BackgroundDeployment:
    """A :class:`Deployment` on an event loop of its own thread, for sync callers (tests, CLIs)."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.deployment = Deployment(cfg)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="deployment", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, timeout: float = 900) -> str:
        return self.run(self.deployment.start(), timeout)

    def stop(self, timeout: float = 120) -> None:
        try:
            self.run(self.deployment.stop(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
