"""The pool manager's side of autoscaling: the :class:`~cluster.autoscaler.PoolControl` calls,
mixed into :class:`cluster.pool_manager.PoolManager` so that its own file only gains a hook.

It uses the manager's machinery as ``cluster.scale`` does: targets and
reconcile (starts in the background, drains before kills), plus the one
thing that is new, moving a drained worker to the other pool in place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from cluster.autoscaler import STATUS_TIMEOUT_S, Autoscaler
from cluster.role_worker import RoleWorker
from worker_common.timeouts import within
from worker_common.worker_status import WorkerStatus

if TYPE_CHECKING:
    from cluster.config import AutoscaleConfig

log = logging.getLogger(__name__)
SWITCH_TIMEOUT_S = 120.0  # building the other engine and transport on a loaded model


class PoolAutoscaleMixin:
    """Mixed into PoolManager (which provides ``specs``, ``workers``, ``targets``, ``_lock``,
    ``_pending``, ``version``, ``_set_targets``, ``_reconcile`` and ``_wait_drained``)."""

    autoscaler: Autoscaler | None = None
    _autoscale_task: asyncio.Task | None = None
    role_switches = 0

    # --------------------------------------------------------------- set-up
    def _init_autoscale(self, cfg: AutoscaleConfig | None) -> None:
        self.autoscale_cfg = cfg

    def _start_autoscaler(self) -> None:
        """(First call of an incarnation.) Start the loop when ``pools.autoscale`` is set."""
        if self.autoscale_cfg is None or set(self.kinds) != {"prefill", "decode"}:
            return
        self.autoscaler = Autoscaler(self.autoscale_cfg, self, self.specs["decode"].engine.max_running)
        self._autoscale_task = asyncio.get_running_loop().create_task(self.autoscaler.run())

    def _stop_autoscaler(self) -> None:
        if self._autoscale_task is not None:
            self._autoscale_task.cancel()
        if self.autoscaler is not None:
            self.autoscaler.stop()

    def autoscale_report(self) -> Any:
        """The autoscaler's :class:`~observability.autoscale.AutoscaleReport`, or ``None`` without one."""
        return None if self.autoscaler is None else self.autoscaler.report()

    async def autoscale_tick(self) -> Any:
        """Run one observation and decision now (benchmarks and tests; the loop runs on its own)."""
        await self._resume()
        return None if self.autoscaler is None else await self.autoscaler.tick()

    def _started(self, seconds: float) -> None:
        """A fresh worker came up after ``seconds`` (placed by Ray, model loaded)."""
        if self.autoscaler is not None:
            self.autoscaler.last_start_s = seconds

    # --------------------------------------------------------- worker class
    def can_switch_roles(self) -> bool:
        """Workers switch role in place when autoscaling asks for it, both pools ask Ray for the same
        resources (a switched actor keeps the ones it was placed with) and hold the model in the same
        format (a switched actor keeps its loaded weights: a bfloat16 prefill worker must not become
        an int4 decode worker)."""
        cfg = self.autoscale_cfg
        if cfg is None or not cfg.role_switch or set(self.kinds) != {"prefill", "decode"}:
            return False
        p, d = self.specs["prefill"], self.specs["decode"]
        return (p.num_cpus, p.num_gpus, p.resources, p.model) == (d.num_cpus, d.num_gpus, d.resources, d.model)

    def _worker_class(self, kind: str, default: type) -> tuple[type, dict]:
        """The actor class of a new ``kind`` worker and its constructor's keyword arguments."""
        spec = self.specs[kind]
        if self.can_switch_roles():
            return RoleWorker, {"role": kind, "model": spec.model, "handoff": spec.handoff,
                                "engines": {k: s.engine for k, s in self.specs.items()}}
        return default, {"model": spec.model, "engine": spec.engine, "handoff": spec.handoff}

    # --------------------------------------------------------- PoolControl
    async def worker_statuses(self) -> list[WorkerStatus]:
        live = [w for w in self.workers.values() if not w.draining]

        async def one(w: Any) -> WorkerStatus | None:
            try:
                return await within(w.handle.status.remote(), timeout_s=STATUS_TIMEOUT_S)
            except Exception:
                return None  # the health loop deals with it

        return [s for s in await asyncio.gather(*(one(w) for w in live)) if s is not None]

    def pool_targets(self) -> tuple[int, int]:
        return self.targets["prefill"], self.targets["decode"]

    def pending_starts(self) -> int:
        return sum(self._pending.values())

    async def set_pool_targets(self, counts: tuple[int, int]) -> None:
        async with self._lock:
            self._set_targets(dict(zip(("prefill", "decode"), counts)))
            for task in self._reconcile():  # in the background; a failure backs off and is retried
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def switch_worker_role(self, frm: str, to: str) -> float:
        """Take the newest ``frm`` worker out of the routing table, wait until it is idle, switch it to
        ``to`` in place and put it back; the targets move with it. On failure the worker is killed and
        the pool manager starts a fresh ``to`` worker in its place."""
        async with self._lock:
            live = sorted((w for w in self.workers.values() if w.kind == frm and not w.draining),
                          key=lambda w: w.worker_id)
            if len(live) < 2:
                raise RuntimeError(f"the {frm} pool has {len(live)} live worker(s); it keeps at least one")
            w = live[-1]
            w.draining = True
            self.version += 1
            targets = dict(self.targets)
            targets[frm] -= 1
            targets[to] += 1
            self._set_targets(targets)
            self._pending[to] += 1  # so reconcile does not start another one meanwhile
        try:
            await self._wait_drained(w)
            t0 = time.perf_counter()
            seconds = await within(w.handle.switch_role.remote(to), timeout_s=SWITCH_TIMEOUT_S)
            endpoint = await within(w.handle.endpoint.remote(), timeout_s=STATUS_TIMEOUT_S)
            async with self._lock:
                w.kind, w.endpoint, w.draining = to, endpoint, False
                self.version += 1
                self.role_switches += 1
            log.info("%s switched %s -> %s in %.2f s (%.2f s with the calls)", w.worker_id, frm, to, seconds,
                     time.perf_counter() - t0)
            return seconds
        except BaseException:
            import ray

            ray.kill(w.handle, no_restart=True)
            self.workers.pop(w.worker_id, None)
            self.version += 1
            raise
        finally:
            self._pending[to] -= 1
