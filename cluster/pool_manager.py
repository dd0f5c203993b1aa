"""The pool manager: creates, health-checks, replaces and scales the actor
pools at the configured prefill:decode ratio.

It runs as a named Ray actor (``<namespace>/pool_manager``) so that the
router in the launch process and the ``cluster.scale`` CLI both reach it.

- ``start(P, D)`` creates ``P`` prefill and ``D`` decode actors (or, in
  colocated mode, ``start(N)`` creates ``N`` colocated actors that run both
  phases) and waits until each answers a ping.
- A health loop pings every actor (with a timeout); one that is dead or
  unresponsive is replaced by a fresh actor under a new id.
- ``scale(total)`` moves to the counts for ``total`` at the ratio. New
  actors join as soon as they are ready; removed ones first leave the
  routing table, then are drained (no running, reserved, queued or held
  request for two consecutive checks) before they are killed, so no request
  is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from cluster.config import split_at_ratio
from decode_worker.colocated import ColocatedWorker
from decode_worker.worker import DecodeWorker
from prefill_worker.worker import PrefillWorker
from worker_common.worker_config import DecodeEngineConfig, HandoffSettings, ModelConfig, PrefillEngineConfig

log = logging.getLogger(__name__)

WORKER_CLASSES = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}
PING_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 600.0  # model loading on a busy 2-core machine is slow


class WorkerStartError(RuntimeError):
    """A worker actor failed to start; the message carries the real cause."""


@dataclass(frozen=True)
class PoolSpec:
    """How to build the actors of one pool: the worker's settings and its Ray resources."""

    kind: str  # "prefill" | "decode" | "colocated"
    model: ModelConfig
    engine: PrefillEngineConfig | DecodeEngineConfig  # the one that ``kind``'s worker class takes
    handoff: HandoffSettings
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class WorkerEntry:
    worker_id: str
    kind: str
    handle: Any
    endpoint: dict
    node_id: str
    draining: bool = False


def start_failure_cause(error: BaseException, spec: PoolSpec) -> str:
    """The cause of a failed actor start in words: Ray's error (it carries the
    constructor's traceback), or, for a timeout, what the actor was waiting for."""
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return (f"not ready after {READY_TIMEOUT_S:.0f} s (it asks for num_cpus={spec.num_cpus}, "
                f"num_gpus={spec.num_gpus}, resources={spec.resources or {}}; a cluster without them leaves "
                "it pending; see `ray status`)")
    text = str(error).strip()
    return text[-4000:] if text else type(error).__name__


class PoolManager:
    """Plain class; launched with ``ray.remote(PoolManager).options(name=...)``."""

    def __init__(self, specs: list[PoolSpec], ratio: tuple[int, ...], *, namespace: str,
                 health_interval_s: float = 2.0, drain_timeout_s: float = 120.0) -> None:
        """``specs``: the pools, prefill then decode (or one colocated pool);
        ``ratio``: their replica ratio, one entry per spec."""
        if len(specs) != len(ratio):
            raise ValueError(f"{len(specs)} pools but a ratio of {len(ratio)} parts")
        self.specs = {spec.kind: spec for spec in specs}
        self.kinds = tuple(self.specs)
        self.ratio = ratio
        self.namespace = namespace
        self.health_interval_s = health_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.workers: dict[str, WorkerEntry] = {}
        self.targets = {kind: 0 for kind in self.kinds}
        self.version = 0  # bumps whenever the routing table changes
        self.replacements = 0
        self._next_index = {kind: 0 for kind in self.kinds}
        self._health: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------- creation
    async def start(self, *counts: int) -> dict:
        """Create the pools with ``counts`` actors (one count per pool) and wait until all answer."""
        async with self._lock:
            self.targets = dict(zip(self.kinds, counts, strict=True))
            await self._reconcile()
        if self._health is None:
            self._health = asyncio.get_running_loop().create_task(self._health_loop())
        return self.table()

    async def _create(self, kind: str) -> WorkerEntry:
        spec = self.specs[kind]
        index = self._next_index[kind]
        self._next_index[kind] += 1
        worker_id = f"{kind}-{index}"
        handle = ray.remote(WORKER_CLASSES[kind]).options(
            name=worker_id, namespace=self.namespace, num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
            resources=spec.resources or None, max_restarts=0,
        ).remote(worker_id, model=spec.model, engine=spec.engine, handoff=spec.handoff)
        try:
            await asyncio.wait_for(handle.ping.remote(), timeout=READY_TIMEOUT_S)
            endpoint, node = await asyncio.wait_for(
                asyncio.gather(handle.endpoint.remote(), handle.node_id.remote()), timeout=PING_TIMEOUT_S)
        except Exception as e:
            # Never leave a half-started actor holding CPUs/GPUs; say why it failed.
            ray.kill(handle, no_restart=True)
            raise WorkerStartError(f"{worker_id} failed to start: {start_failure_cause(e, spec)}") from e
        return WorkerEntry(worker_id, kind, handle, endpoint, node)

    async def _reconcile(self) -> None:
        """Create or drain actors until each pool matches its target."""
        adds = []
        for kind in self.kinds:
            live = [w for w in self.workers.values() if w.kind == kind and not w.draining]
            missing = self.targets[kind] - len(live)
            adds += [self._create(kind) for _ in range(max(missing, 0))]
            for w in sorted(live, key=lambda w: w.worker_id, reverse=True)[:max(-missing, 0)]:
                w.draining = True
                self.version += 1
                asyncio.get_running_loop().create_task(self._drain_and_kill(w))
        # Keep every actor that did start even when another failed (it would leak otherwise).
        results = await asyncio.gather(*adds, return_exceptions=True)
        for entry in results:
            if isinstance(entry, WorkerEntry):
                self.workers[entry.worker_id] = entry
                self.version += 1
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    # -------------------------------------------------------------- queries
    def table(self) -> dict:
        """The routing table: live, non-draining workers and their endpoints."""
        return {
            "version": self.version,
            "targets": dict(self.targets),
            "workers": [
                {"worker_id": w.worker_id, "kind": w.kind, "handle": w.handle, "endpoint": w.endpoint,
                 "node_id": w.node_id}
                for w in self.workers.values() if not w.draining
            ],
        }

    def counts(self) -> dict[str, int]:
        live = [w for w in self.workers.values() if not w.draining]
        return {kind: sum(w.kind == kind for w in live) for kind in self.kinds}

    def stats(self) -> dict:
        return {"replacements": self.replacements, "draining": sum(w.draining for w in self.workers.values())}

    # -------------------------------------------------------------- scaling
    async def scale(self, total: int) -> dict[str, int]:
        """Resize the pools to ``total`` actors at the ratio; returns the new counts."""
        counts = split_at_ratio(self.ratio, total) if len(self.kinds) == 2 else (total,)
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        async with self._lock:
            self.targets = dict(zip(self.kinds, counts))
            await self._reconcile()
        return self.counts()

    async def _drain_and_kill(self, w: WorkerEntry) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        idle_checks = 0
        while idle_checks < 2 and time.monotonic() < deadline:
            await asyncio.sleep(1.0)  # longer than the router's table refresh
            try:
                s = await asyncio.wait_for(w.handle.status.remote(), timeout=PING_TIMEOUT_S)
            except Exception:
                break  # already dead
            idle_checks = 0 if s.busy else idle_checks + 1
        try:
            await asyncio.wait_for(w.handle.shutdown.remote(), timeout=PING_TIMEOUT_S)
        except Exception:
            pass
        ray.kill(w.handle)
        self.workers.pop(w.worker_id, None)

    # --------------------------------------------------------------- health
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_health()
            except Exception:
                log.exception("health check failed")

    async def check_health(self) -> list[str]:
        """Ping every worker; replace the dead. Returns the ids replaced."""
        async with self._lock:
            live = [w for w in self.workers.values() if not w.draining]

            async def alive(w: WorkerEntry) -> bool:
                try:
                    await asyncio.wait_for(w.handle.ping.remote(), timeout=PING_TIMEOUT_S)
                    return True
                except Exception:
                    return False

            results = await asyncio.gather(*(alive(w) for w in live))
            dead = [w for w, ok in zip(live, results) if not ok]
            for w in dead:
                log.warning("worker %s is dead; replacing it", w.worker_id)
                self.workers.pop(w.worker_id, None)
                ray.kill(w.handle)
                self.version += 1
                self.replacements += 1
            if dead:
                await self._reconcile()
            return [w.worker_id for w in dead]

    async def stop(self) -> None:
        """Kill every actor (after the router stopped sending work)."""
        if self._health is not None:
            self._health.cancel()
        for w in list(self.workers.values()):
            try:
                await asyncio.wait_for(w.handle.shutdown.remote(), timeout=PING_TIMEOUT_S)
            except Exception:
                pass
            ray.kill(w.handle)
        self.workers.clear()
        self.version += 1
