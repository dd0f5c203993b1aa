"""A running deployment: the pool manager actor plus the routers.

``Deployment`` is what ``cluster.launch`` serves and what the integration
tests start; it is the only code that reads the whole config tree and turns
it into the explicit arguments of the pool manager, workers and routers.

The pool manager and the workers are detached named actors of the
deployment's Ray namespace: they outlive the process that launched them. A
launch finds a pool manager already running in its namespace (its
predecessor was killed) and adopts it with its workers; one that is gone is
created anew (it adopts the live workers by name). With ``router.replicas``
1 the router runs in this process; with N > 1 it runs as N detached
:class:`~cluster.router_replica.RouterReplica` actors on this node sharing
one port (adopted by name too, restarted by Ray when one dies), and this
process only supervises. ``stop`` drains the routers, then ends every named
actor of the namespace, so a stopped deployment leaks none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from typing import Any

import ray
from prometheus_client import CollectorRegistry
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.config import ClusterConfig
from cluster.local_ray import free_port
from cluster.pool_manager import POOL_MANAGER_NAME, PoolManager, PoolSpec, kill_named_actors
from cluster.preflight import preflight
from cluster.router_replica import (READY_TIMEOUT_S, RouterReplica, RouterSettings, RouterStats, RunningRouter,
                                    router_actor_name, start_router)
from kvtransfer.faults import TransferFaults
from router.security import load_secret
from router.server import RouterServer
from worker_common.timeouts import within
from worker_common.worker_config import DecodeEngineConfig, HandoffSettings, PrefillEngineConfig

log = logging.getLogger(__name__)
SUPERVISE_INTERVAL_S = 2.0


def pool_specs(cfg: ClusterConfig, kv_secret: str | None = None,
               faults: TransferFaults | None = None) -> list[PoolSpec]:
    """What each pool's workers are built from, and their Ray resources:
    prefill and decode, or the one colocated pool (decode's settings).
    ``faults``: injected into every worker's transport (tests)."""
    kv = cfg.kvtransfer
    handoff = HandoffSettings(backend=kv.backend, lease_s=kv.lease_s, host=kv.host, chunk_bytes=kv.chunk_bytes,
                              namespace=cfg.ray.namespace, stream_idle_s=kv.stream_idle_s,
                              max_streams_per_peer=kv.max_streams_per_peer, same_node=kv.same_node,
                              shm_pool_bytes=kv.shm_pool_bytes, secret=kv_secret, faults=faults)
    p, d = cfg.pools.prefill, cfg.pools.decode
    decode = PoolSpec(kind="colocated" if cfg.pools.colocated else "decode",
                      model=cfg.model.for_pool(d.dtype, d.quantization),
                      engine=DecodeEngineConfig.part_of(d), handoff=handoff, num_cpus=d.num_cpus,
                      num_gpus=d.num_gpus, resources=dict(d.resources))
    if cfg.pools.colocated:
        return [decode]
    prefill = PoolSpec(kind="prefill", model=cfg.model.for_pool(p.dtype, p.quantization), engine=PrefillEngineConfig.part_of(p), handoff=handoff,
                       num_cpus=p.num_cpus, num_gpus=p.num_gpus, resources=dict(p.resources))
    return [prefill, decode]


def router_settings(cfg: ClusterConfig, token: str | None) -> RouterSettings:
    """What each router is built from (``port`` as configured: 0 is resolved at start)."""
    rc = cfg.router
    tls = (os.path.abspath(rc.tls_cert), os.path.abspath(rc.tls_key)) if rc.tls_cert and rc.tls_key else None
    return RouterSettings(
        config=rc, model_name=cfg.model.name, transfer_timeout_s=cfg.kvtransfer.timeout_s,
        colocated=cfg.pools.colocated, namespace=cfg.ray.namespace, pool_manager_name=POOL_MANAGER_NAME,
        tls=tls, token=token, port=rc.port, http_port=rc.http_port)


class Deployment:
    """Pools + routers (+ metrics endpoints) for one config, driven from the current event loop.

    ``faults``: injected into every worker's KV transport (tests).
    """

    def __init__(self, cfg: ClusterConfig, faults: TransferFaults | None = None) -> None:
        self.cfg = cfg
        self.faults = faults
        self.pool_manager: Any = None
        self.router: RouterServer | None = None  # the in-process router (router.replicas 1), else None
        self.replicas: list[Any] = []  # the RouterReplica actors (router.replicas > 1), by index
        self.router_settings: RouterSettings | None = None
        self.registry = CollectorRegistry()  # the in-process router's metrics
        self.metrics_port: int | None = None  # router 0's /metrics port (replica i: this + i)
        self._local: RunningRouter | None = None
        self._address: str | None = None
        self._pool_args: tuple = ()
        self._supervisor: asyncio.Task | None = None

    @property
    def address(self) -> str:
        """``host:port`` every router of the deployment serves."""
        assert self._address is not None, "not started"
        return self._address

    @property
    def http_url(self) -> str | None:
        """The OpenAI-compatible API's base URL (``.../v1``), None when ``router.http_port`` is off."""
        assert self._address is not None, "not started"
        if self.router is not None:  # the in-process router: where it bound (port 0 resolved)
            http = self.router.http
            port = http.port if http is not None else None
        else:
            port = self.router_settings.http_port
        if port is None:
            return None
        scheme = "https" if self.router_settings.tls else "http"
        return f"{scheme}://{self.cfg.router.host}:{port}/v1"

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
        self.router_settings = router_settings(cfg, token)
        if rc.replicas == 1:
            # One router, in this process (tests reach its servicer through ``self.router``).
            self._local = await start_router(self.router_settings, self.pool_manager, self.find_pool_manager,
                                             rc.metrics_port, self.registry)
            self.router, self.metrics_port = self._local.server, self._local.metrics_port
            self._address = self.router.address
        else:
            self.replicas = await asyncio.to_thread(self.find_or_create_replicas)
            stats = await asyncio.gather(*(within(h.ready.remote(), timeout_s=READY_TIMEOUT_S)
                                           for h in self.replicas))
            self._address = stats[0].address
            self.metrics_port = stats[0].metrics_port
        log.info("serving %s on %s with %d router(s) (metrics on %s)", cfg.model.name, self._address,
                 rc.replicas, self.metrics_port)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        return self._address

    def find_or_create_replicas(self) -> list[Any]:
        """The namespace's router replicas ``router-0..N-1``: those running (a killed launch left
        them serving) are adopted, the missing ones created on this node. Port 0 is resolved
        here, once: every replica (and every Ray restart of one) binds the same port."""
        n, namespace = self.cfg.router.replicas, self.cfg.ray.namespace
        handles: dict[int, Any] = {}
        for i in range(n):
            try:
                handles[i] = ray.get_actor(router_actor_name(i), namespace=namespace)
            except ValueError:
                pass
        port = self.cfg.router.port
        if handles:  # serve where the adopted replicas serve
            port = ray.get(next(iter(handles.values())).ready.remote(), timeout=READY_TIMEOUT_S).address
            port = int(port.rsplit(":", 1)[1])
        elif port == 0:
            port = free_port()
        http_port = self.router_settings.http_port
        if handles:
            http_port = ray.get(next(iter(handles.values())).ready.remote(), timeout=READY_TIMEOUT_S).http_port
        elif http_port == 0:
            http_port = free_port()
        self.router_settings = dataclasses.replace(self.router_settings, port=port, http_port=http_port,
                                                   reuse_port=True)
        for i in range(n):
            if i not in handles:
                handles[i] = self.create_replica(i)
        return [handles[i] for i in range(n)]

    def create_replica(self, index: int) -> Any:
        """Router replica ``index``: detached (it outlives this process), no CPU reserved (it
        would not fit beside the workers on a small machine), on this node (it binds
        ``router.host`` here), and restarted by Ray whenever its process dies."""
        return ray.remote(RouterReplica).options(
            name=router_actor_name(index), namespace=self.cfg.ray.namespace, lifetime="detached",
            get_if_exists=True, num_cpus=0, max_restarts=-1, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        ).remote(index, self.router_settings)

    async def router_stats(self) -> list[RouterStats]:
        """Every router's :class:`RouterStats` (a replica that does not answer is left out)."""
        if self._local is not None:
            return [self._local.stats(0)]
        results = await asyncio.gather(*(within(h.stats.remote(), timeout_s=30) for h in self.replicas),
                                       return_exceptions=True)
        return [r for r in results if isinstance(r, RouterStats)]

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
        """Recreate the pool manager, or a router replica, when it is gone for good (killed, or
        Ray gave up restarting it). A replica whose process died is restarted by Ray itself."""
        while True:
            await asyncio.sleep(SUPERVISE_INTERVAL_S)
            try:
                await asyncio.to_thread(self.find_pool_manager)
            except ValueError:
                log.warning("the pool manager is gone; recreating it (it adopts the live workers)")
                try:
                    pm = await asyncio.to_thread(self.find_or_create_pool_manager)
                    await within(pm.table.remote(), timeout_s=60)
                except Exception:
                    log.exception("recreating the pool manager failed; retrying")
            except Exception:
                log.exception("supervision check failed")
            for i, _ in enumerate(self.replicas):
                try:
                    await asyncio.to_thread(ray.get_actor, router_actor_name(i), namespace=self.cfg.ray.namespace)
                except ValueError:
                    log.warning("router replica %d is gone; recreating it", i)
                    self.replicas[i] = await asyncio.to_thread(self.create_replica, i)
                except Exception:
                    log.exception("supervision check of router replica %d failed", i)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain the routers (``router.drain_grace_s`` unless given), then stop every actor of the namespace."""
        grace = self.cfg.router.drain_grace_s if grace_s is None else grace_s
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        if self._local is not None:
            await self._local.stop(grace)
            self._local = None
        if self.replicas:
            # Every replica drains at once; one that is dead or stuck is killed below with the rest.
            drained = await asyncio.gather(*(within(h.drain.remote(grace), timeout_s=grace + 60)
                                             for h in self.replicas), return_exceptions=True)
            for i, r in enumerate(drained):
                if isinstance(r, BaseException):
                    log.warning("router replica %d did not drain (%r); killing it", i, r)
        try:
            if self.pool_manager is not None:
                await within(self.pool_manager.stop.remote(), timeout_s=60)
        except Exception:
            log.exception("the pool manager did not stop its workers; killing them")
        finally:
            self.pool_manager = None
            # Everything here is detached: whatever is still alive (a worker being started,
            # the manager, the router replicas) would outlive this process otherwise.
            killed = await asyncio.to_thread(kill_named_actors, self.cfg.ray.namespace)
            self.replicas = []
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
