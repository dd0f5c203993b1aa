"""A running deployment: the pool manager actor plus the router server.

``Deployment`` is what ``cluster.launch`` serves and what the integration
tests start; it is the only code that reads the whole config tree and turns
it into the explicit arguments of the pool manager, workers and router.

The pool manager and the workers are detached named actors of the
deployment's Ray namespace: they outlive the process that launched them. A
launch finds a pool manager already running in its namespace (its
predecessor was killed) and adopts it with its workers; one that is gone is
created anew (it adopts the live workers by name). ``stop`` ends every named
actor of the namespace, so a stopped deployment leaks none.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import ray

from prometheus_client import CollectorRegistry

from cluster.config import ClusterConfig
from cluster.pool_manager import PoolManager, PoolSpec, kill_named_actors
from cluster.preflight import preflight
from engine.model_loader import load_tokenizer
from kvtransfer.faults import TransferFaults
from observability.metrics import AutoscaleCollector, RouterMetrics, WorkerStatusCollector, start_metrics_server
from router.directory import WorkerDirectory
from router.policy import make_policy
from router.request_runner import RequestRunner
from router.security import load_secret
from router.server import RouterServer, ServingServicer, fetch_limits
from worker_common.worker_config import DecodeEngineConfig, HandoffSettings, PrefillEngineConfig

log = logging.getLogger(__name__)
POOL_MANAGER_NAME = "pool_manager"
SUPERVISE_INTERVAL_S = 2.0


def pool_specs(cfg: ClusterConfig, kv_secret: str | None = None,
               faults: TransferFaults | None = None) -> list[PoolSpec]:
    """What each pool's workers are built from, and their Ray resources:
    prefill and decode, or the one colocated pool (decode's settings).
    ``faults``: injected into every worker's transport (tests)."""
    kv = cfg.kvtransfer
    handoff = HandoffSettings(backend=kv.backend, lease_s=kv.lease_s, host=kv.host, chunk_bytes=kv.chunk_bytes,
                              namespace=cfg.ray.namespace, stream_idle_s=kv.stream_idle_s,
                              max_streams_per_peer=kv.max_streams_per_peer, secret=kv_secret, faults=faults)
    p, d = cfg.pools.prefill, cfg.pools.decode
    decode = PoolSpec(kind="colocated" if cfg.pools.colocated else "decode", model=cfg.model,
                      engine=DecodeEngineConfig.part_of(d), handoff=handoff, num_cpus=d.num_cpus,
                      num_gpus=d.num_gpus, resources=dict(d.resources))
    if cfg.pools.colocated:
        return [decode]
    prefill = PoolSpec(kind="prefill", model=cfg.model, engine=PrefillEngineConfig.part_of(p), handoff=handoff,
                       num_cpus=p.num_cpus, num_gpus=p.num_gpus, resources=dict(p.resources))
    return [prefill, decode]


class Deployment:
    """Pools + router (+ metrics endpoint) for one config, driven from the current event loop.

    ``faults``: injected into every worker's KV transport (tests).
    """

    def __init__(self, cfg: ClusterConfig, faults: TransferFaults | None = None) -> None:
        self.cfg = cfg
        self.faults = faults
        self.pool_manager: Any = None
        self.router: RouterServer | None = None
        self.registry = CollectorRegistry()
        self.metrics_server: Any = None
        self.metrics_port: int | None = None
        self._pool_args: tuple = ()
        self._supervisor: asyncio.Task | None = None

    @property
    def address(self) -> str:
        assert self.router is not None, "not started"
        return self.router.address

    async def start(self) -> str:
        cfg, rc = self.cfg, self.cfg.router
        # KV caches that cannot fit stop the launch here, before any actor holds a CPU or GPU.
        await asyncio.to_thread(preflight, cfg)
        # Secrets are read here, once; a missing one stops the launch with its source named.
        token = load_secret(env=rc.auth_token_env, file=rc.auth_token_file)
        kv_secret = load_secret(env=cfg.kvtransfer.secret_env, file=cfg.kvtransfer.secret_file)
        self._pool_args = (pool_specs(cfg, kv_secret, self.faults),
                           (1,) if cfg.pools.colocated else cfg.pools.ratio_pair(),
                           (cfg.pools.counts()[1],) if cfg.pools.colocated else cfg.pools.counts())
        self.pool_manager = await asyncio.to_thread(self.find_or_create_pool_manager)
        await self.pool_manager.start.remote()
        colocated = cfg.pools.colocated
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg.model.name)
        directory = WorkerDirectory(self.pool_manager, find_pool_manager=self.find_pool_manager)
        await directory.refresh()
        limits = await fetch_limits(directory)
        runner = RequestRunner(directory, make_policy(rc.policy), make_policy(rc.policy),
                               transfer_timeout_s=cfg.kvtransfer.timeout_s,
                               queue_timeout_s=rc.queue_timeout_s,
                               max_attempts=rc.max_attempts, transfer_retries=rc.transfer_retries,
                               colocated=colocated)
        metrics = RouterMetrics(self.registry)
        self.registry.register(WorkerStatusCollector(
            lambda: [w.status for w in list(directory.workers.values()) if w.status is not None]))
        self.registry.register(AutoscaleCollector(lambda: directory.autoscale))
        servicer = ServingServicer(runner, directory, tokenizer, limits, rc.max_queued, metrics,
                                   request_timeout_s=rc.request_timeout_s)
        tls = (rc.tls_cert, rc.tls_key) if rc.tls_cert and rc.tls_key else None
        self.router = RouterServer(servicer, rc.host, rc.port, tls=tls, token=token,
                                   max_request_bytes=rc.max_request_bytes)
        await self.router.start()
        if rc.metrics_port is not None:
            self.metrics_server, self.metrics_port = start_metrics_server(self.registry, rc.metrics_host,
                                                                            rc.metrics_port)
        log.info("serving %s on %s (metrics on %s)", cfg.model.name, self.router.address, self.metrics_port)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        return self.router.address

    def find_pool_manager(self) -> Any:
        """The pool manager's current handle, by name (ValueError if there is none)."""
        return ray.get_actor(POOL_MANAGER_NAME, namespace=self.cfg.ray.namespace)

    def find_or_create_pool_manager(self) -> Any:
        """The namespace's pool manager: the running one (adopted with its workers) or a new one.

        Detached, so it outlives this process; Ray restarts it when its process dies
        (the new incarnation adopts the live workers by name)."""
        try:
            return self.find_pool_manager()
        except ValueError:
            pass
        specs, ratio, counts = self._pool_args
        return ray.remote(PoolManager).options(
            name=POOL_MANAGER_NAME, namespace=self.cfg.ray.namespace, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_concurrency=64, max_restarts=-1,
        ).remote(specs, ratio, counts, namespace=self.cfg.ray.namespace, autoscale=self.cfg.pools.autoscale)

    async def _supervise(self) -> None:
        """Recreate the pool manager when it is gone for good (killed, or Ray gave up restarting it)."""
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            try:
                await asyncio.to_thread(self.find_pool_manager)
            except ValueError:
                log.warning("the pool manager is gone; recreating it (it adopts the live workers)")
                try:
                    pm = await asyncio.to_thread(self.find_or_create_pool_manager)
                    await asyncio.wait_for(pm.table.remote(), timeout=60)
                except Exception:
                    log.exception("recreating the pool manager failed; retrying")
            except Exception:
                log.exception("supervision check failed")

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain the router (``router.drain_grace_s`` unless given), then stop every actor of the namespace."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        if self.router is not None:
            await self.router.stop(self.cfg.router.drain_grace_s if grace_s is None else grace_s)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        try:
            if self.pool_manager is not None:
                await asyncio.wait_for(self.pool_manager.stop.remote(), timeout=60)
        except Exception:
            log.exception("the pool manager did not stop its workers; killing them")
        finally:
            self.pool_manager = None
            # Everything here is detached: whatever is still alive (a worker being started,
            # the manager itself) would outlive this process otherwise.
            killed = await asyncio.to_thread(kill_named_actors, self.cfg.ray.namespace)
            log.info("stopped %s", killed)


class BackgroundDeployment:
    """A :class:`Deployment` on an event loop of its own thread, for sync callers (tests, CLIs)."""

    def __init__(self, cfg: ClusterConfig, faults: TransferFaults | None = None) -> None:
        self.deployment = Deployment(cfg, faults)
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
