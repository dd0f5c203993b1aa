"""The pool manager: creates, health-checks, replaces and scales the actor
pools at the configured prefill:decode ratio.

It runs as a named, detached Ray actor (``<namespace>/pool_manager``) so
that the routers and the ``cluster.scale`` CLI reach it by name, and it
creates the workers as named, detached actors (``<namespace>/<kind>-<n>``):
none of them dies with the process that launched the deployment. Ray
restarts the manager when its process dies (``max_restarts=-1``); the first
call to the new incarnation adopts the live workers by name (instead of
creating new ones) and resumes the health checks. The pool targets survive
in Ray's internal KV store, so a ``cluster.scale`` is not undone.

- ``start(P, D)`` creates ``P`` prefill and ``D`` decode actors (or, in
  colocated mode, ``start(N)`` creates ``N`` colocated actors that run both
  phases) and waits until each answers a ping.
- A health loop pings every actor (with a timeout); one that is dead or
  unresponsive is replaced by a fresh actor under a new id. Replacements
  start in the background (never under the manager's lock); one that fails
  to start is killed and retried with exponential backoff.
- ``scale(total)`` moves to the counts for ``total`` at the ratio. New
  actors join as soon as they are ready; removed ones first leave the
  routing table, then are drained (no running, reserved, queued or held
  request for two consecutive checks) before they are killed, so no request
  is lost.
- With ``pools.autoscale``, an autoscaling loop (:mod:`cluster.autoscaler`,
  wired in by :class:`~cluster.pool_autoscale.PoolAutoscaleMixin`) moves the
  targets itself and may switch a drained worker's role in place.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from cluster.config import AutoscaleConfig, split_at_ratio
from cluster.pool_autoscale import PoolAutoscaleMixin
from decode_worker.colocated import ColocatedWorker
from decode_worker.worker import DecodeWorker
from kvtransfer.endpoints import Endpoint
from prefill_worker.worker import PrefillWorker
from worker_common.routing_table import RoutingTable, TableWorker
from worker_common.timeouts import within
from worker_common.worker_config import DecodeEngineConfig, HandoffSettings, ModelConfig, PrefillEngineConfig

log = logging.getLogger(__name__)

WORKER_CLASSES = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}
PING_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 600.0  # model loading on a busy 2-core machine is slow
RETRY_BASE_S = 1.0  # a failed worker start is retried after 1, 2, 4, ... s
RETRY_MAX_S = 60.0
KILL_WAIT_S = 60.0  # how long a teardown waits for killed actors to be gone
KILL_RESEND_S = 5.0  # a kill not yet acted on is sent again after this long
KILL_QUIET_S = 2.0  # after a teardown's kills, the namespace must stay empty this long
POOL_MANAGER_NAME = "pool_manager"  # the deployment's one pool manager actor, in its namespace
WORKER_NAME = re.compile(r"(prefill|decode|colocated)-(\d+)")


def worker_actor_name(kind: str, index: int) -> str:
    """A worker's actor name (and id) in the deployment's namespace; :data:`WORKER_NAME` parses it."""
    return f"{kind}-{index}"


def retry_delay_s(failures: int) -> float:
    """Backoff before the next start of a pool whose last ``failures`` starts failed in a row."""
    return min(RETRY_BASE_S * 2 ** max(failures - 1, 0), RETRY_MAX_S)


def named_actors(namespace: str) -> list[str]:
    """Names of the live named actors of ``namespace``."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]


def kill_named_actors(namespace: str, timeout_s: float = KILL_WAIT_S) -> list[str]:
    """Kill every named actor of ``namespace`` (the deployment's pool manager, routers and
    workers: all detached, so nothing else ends them) and wait until none is listed; return
    their names.

    The pool manager goes first, and is waited for: alive, it replaces the workers the teardown
    kills. ``ray.kill`` only sends the request: a caller that exits at once (``cluster.launch
    --teardown``) could leave before the GCS acted on it, and on a loaded machine a death takes
    seconds to be recorded. So the kill is re-sent to whatever is still listed every
    :data:`KILL_RESEND_S` until the namespace is empty, and the namespace must then stay empty for
    :data:`KILL_QUIET_S` (a worker the manager asked for just before it died can still register
    its name after that); after ``timeout_s`` the survivors are logged (not raised: a teardown
    kills what it can).
    """
    killed: set[str] = set()
    deadline = time.monotonic() + timeout_s
    if not _kill_until_gone(namespace, {POOL_MANAGER_NAME}, deadline, killed):
        return sorted(killed)
    while _kill_until_gone(namespace, None, deadline, killed):
        quiet_until = min(time.monotonic() + KILL_QUIET_S, deadline)
        while time.monotonic() < quiet_until and not named_actors(namespace):
            time.sleep(0.2)
        if not named_actors(namespace):
            break
    return sorted(killed)


def _kill_until_gone(namespace: str, only: set[str] | None, deadline: float, killed: set[str]) -> bool:
    """Kill the named actors of ``namespace`` (those in ``only``, or all) until none of them is
    listed, adding their names to ``killed``; False when ``deadline`` passed first."""
    while True:
        alive = [name for name in named_actors(namespace) if only is None or name in only]
        if not alive:
            return True
        if time.monotonic() > deadline:
            log.warning("actors of namespace %r still listed after their kill: %s", namespace, ", ".join(sorted(alive)))
            return False
        for name in alive:
            try:
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
                killed.add(name)
            except ValueError:
                pass  # gone meanwhile
        resend_at = time.monotonic() + KILL_RESEND_S
        while time.monotonic() < min(resend_at, deadline) and set(named_actors(namespace)) & set(alive):
            time.sleep(0.2)


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
    endpoint: Endpoint
    node_id: str
    draining: bool = False


@dataclass(frozen=True)
class PoolManagerStats:
    """What the pool manager has done since this incarnation started: workers replaced after they died,
    workers draining now, workers it adopted (found alive) instead of creating, failed starts, starts
    under way."""

    replacements: int
    draining: int
    adopted: tuple[str, ...]
    start_failures: int
    pending: int


def start_failure_cause(error: BaseException, spec: PoolSpec) -> str:
    """The cause of a failed actor start in words: Ray's error (it carries the
    constructor's traceback), or, for a timeout, what the actor was waiting for."""
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return (f"not ready after {READY_TIMEOUT_S:.0f} s (it asks for num_cpus={spec.num_cpus}, "
                f"num_gpus={spec.num_gpus}, resources={spec.resources or {}}; a cluster without them leaves "
                "it pending; see `ray status`)")
    text = str(error).strip()
    return text[-4000:] if text else type(error).__name__


class PoolManager(PoolAutoscaleMixin):
    """Plain class; launched with ``ray.remote(PoolManager).options(name=..., lifetime="detached")``."""

    def __init__(self, specs: list[PoolSpec], ratio: tuple[int, ...], counts: tuple[int, ...], *, namespace: str,
                 health_interval_s: float = 2.0, drain_timeout_s: float = 120.0,
                 autoscale: AutoscaleConfig | None = None) -> None:
        """``specs``: the pools, prefill then decode (or one colocated pool);
        ``ratio``: their replica ratio, one entry per spec; ``counts``: the
        initial pool sizes (a restarted manager keeps the last targets instead);
        ``autoscale``: ``pools.autoscale`` (None: the sizes move only by :meth:`scale`)."""
        if not len(specs) == len(ratio) == len(counts):
            raise ValueError(f"{len(specs)} pools but a ratio of {len(ratio)} parts and {len(counts)} counts")
        self.specs = {spec.kind: spec for spec in specs}
        self.kinds = tuple(self.specs)
        self.ratio = ratio
        self.namespace = namespace
        self.health_interval_s = health_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.workers: dict[str, WorkerEntry] = {}
        self.targets = dict(zip(self.kinds, counts))
        self.version = 0  # bumps whenever the routing table changes
        self.incarnation = uuid.uuid4().hex  # tells this incarnation's tables from a predecessor's
        self.replacements = 0
        self.adopted: list[str] = []  # workers this incarnation found alive instead of creating
        self.start_failures = 0  # worker starts that failed (each killed, then retried)
        self._next_index = {kind: 0 for kind in self.kinds}
        self._pending = {kind: 0 for kind in self.kinds}  # starts under way
        self._failures = {kind: 0 for kind in self.kinds}  # consecutive failed starts
        self._retry_at = {kind: 0.0 for kind in self.kinds}  # time.monotonic() of the next allowed start
        self._health: asyncio.Task | None = None
        self._resumed = False
        self._stopped = False
        self._lock = asyncio.Lock()
        self._init_autoscale(autoscale)

    # ------------------------------------------------------------- creation
    async def start(self) -> RoutingTable:
        """Adopt the live workers, create the missing ones and wait until they answer
        (WorkerStartError if one fails); then keep them healthy. Idempotent."""
        await self._resume()
        async with self._lock:
            tasks = self._reconcile()
        await self._wait(tasks)
        return await self.table()

    async def _resume(self) -> None:
        """First call of this incarnation (fresh, or restarted by Ray): adopt the pools' live
        workers by name, restore the targets and start the health loop."""
        if self._resumed:
            return
        async with self._lock:
            if self._resumed:
                return
            saved = _load_targets(self.namespace)
            if saved is not None and set(saved) == set(self.kinds):
                self.targets = saved
            await self._adopt()
            self._resumed = True
            self._health = asyncio.get_running_loop().create_task(self._health_loop())
            self._start_autoscaler()

    async def _adopt(self) -> None:
        names = await asyncio.to_thread(named_actors, self.namespace)
        for name in names:
            m = WORKER_NAME.fullmatch(name)
            if m is None or m.group(1) not in self.specs:
                continue
            kind, index = m.group(1), int(m.group(2))
            self._next_index[kind] = max(self._next_index[kind], index + 1)
            try:
                handle = await asyncio.to_thread(ray.get_actor, name, namespace=self.namespace)
                entry = await self._describe(name, kind, handle, PING_TIMEOUT_S)
            except Exception as e:
                log.warning("not adopting %s (%s); killing it", name, e)
                try:
                    ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=True)
                except Exception:
                    pass
                continue
            self.workers[name] = entry
            self.adopted.append(name)
            self.version += 1
        if self.adopted:
            log.info("adopted live workers %s", self.adopted)

    @staticmethod
    async def _describe(worker_id: str, kind: str, handle: Any, ready_timeout_s: float) -> WorkerEntry:
        await within(handle.ping.remote(), timeout_s=ready_timeout_s)
        endpoint, node, status = await within(
            asyncio.gather(handle.endpoint.remote(), handle.node_id.remote(), handle.status.remote()),
            timeout_s=PING_TIMEOUT_S)
        # The kind it serves now: a worker that switched role keeps the name it started with.
        return WorkerEntry(worker_id, status.kind, handle, endpoint, node)

    async def _create(self, kind: str) -> WorkerEntry:
        spec = self.specs[kind]
        worker_id = worker_actor_name(kind, self._next_index[kind])
        self._next_index[kind] += 1
        cls, kwargs = self._worker_class(kind, WORKER_CLASSES[kind])
        # Detached: the worker outlives the manager (a restarted manager adopts it by name).
        handle = ray.remote(cls).options(
            name=worker_id, namespace=self.namespace, lifetime="detached", num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus, resources=spec.resources or None, max_restarts=0,
        ).remote(worker_id, **kwargs)
        try:
            entry = await self._describe(worker_id, kind, handle, READY_TIMEOUT_S)
        except BaseException as e:
            # Never leave a half-started actor holding CPUs/GPUs; say why it failed.
            ray.kill(handle, no_restart=True)
            if not isinstance(e, Exception):
                raise
            raise WorkerStartError(f"{worker_id} failed to start: {start_failure_cause(e, spec)}") from e
        if self._stopped:  # stop() came while it started: it must not outlive the pools
            ray.kill(handle, no_restart=True)
            raise WorkerStartError(f"{worker_id} started after the pools were stopped")
        return entry

    async def _add(self, kind: str) -> WorkerEntry:
        """Start one worker of ``kind`` and put it in the table; a failure is counted and
        backs that pool's next start off (the health loop retries it)."""
        self._pending[kind] += 1
        t0 = time.monotonic()
        try:
            entry = await self._create(kind)
        except Exception as e:
            self._failures[kind] += 1
            self.start_failures += 1
            delay = retry_delay_s(self._failures[kind])
            self._retry_at[kind] = time.monotonic() + delay
            log.warning("%s; retrying the %s pool in %.0f s", e, kind, delay)
            raise
        finally:
            self._pending[kind] -= 1
        self._failures[kind] = 0
        self.workers[entry.worker_id] = entry
        self.version += 1
        self._started(time.monotonic() - t0)
        return entry

    def _reconcile(self) -> list[asyncio.Task]:
        """(Under the lock.) Start or drain actors until each pool matches its target; return the
        start tasks, which run on their own (the lock is not held while models load)."""
        loop = asyncio.get_running_loop()
        adds = []
        now = time.monotonic()
        for kind in self.kinds:
            live = [w for w in self.workers.values() if w.kind == kind and not w.draining]
            missing = self.targets[kind] - len(live) - self._pending[kind]
            if missing > 0 and now >= self._retry_at[kind]:
                adds += [loop.create_task(self._add(kind)) for _ in range(missing)]
            for w in sorted(live, key=lambda w: w.worker_id, reverse=True)[:max(-missing, 0)]:
                w.draining = True
                self.version += 1
                loop.create_task(self._drain_and_kill(w))
        return adds

    @staticmethod
    async def _wait(tasks: list[asyncio.Task]) -> None:
        """Wait for every start (keeping every actor that did start); raise the first failure."""
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    def _set_targets(self, targets: dict[str, int]) -> None:
        self.targets = targets
        _save_targets(self.namespace, targets)

    # -------------------------------------------------------------- queries
    async def table(self) -> RoutingTable:
        """The routing table: live, non-draining workers and their endpoints."""
        await self._resume()
        return RoutingTable(
            incarnation=self.incarnation,
            version=self.version,
            targets=dict(self.targets),
            workers=tuple(TableWorker(w.worker_id, w.kind, w.handle, w.endpoint, w.node_id)
                          for w in self.workers.values() if not w.draining),
            autoscale=self.autoscale_report(),
        )

    async def counts(self) -> dict[str, int]:
        await self._resume()
        live = [w for w in self.workers.values() if not w.draining]
        return {kind: sum(w.kind == kind for w in live) for kind in self.kinds}

    async def stats(self) -> PoolManagerStats:
        await self._resume()
        return PoolManagerStats(replacements=self.replacements,
                                draining=sum(w.draining for w in self.workers.values()),
                                adopted=tuple(self.adopted), start_failures=self.start_failures,
                                pending=sum(self._pending.values()))

    def pid(self) -> int:
        import os

        return os.getpid()

    # -------------------------------------------------------------- scaling
    async def scale(self, total: int) -> dict[str, int]:
        """Resize the pools to ``total`` actors at the ratio; returns the new counts."""
        counts = split_at_ratio(self.ratio, total) if len(self.kinds) == 2 else (total,)
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        await self._resume()
        async with self._lock:
            self._set_targets(dict(zip(self.kinds, counts)))
            self._retry_at = {kind: 0.0 for kind in self.kinds}  # an explicit resize tries at once
            tasks = self._reconcile()
        await self._wait(tasks)
        return await self.counts()

    async def _drain_and_kill(self, w: WorkerEntry) -> None:
        await self._wait_drained(w)
        try:
            await within(w.handle.shutdown.remote(), timeout_s=PING_TIMEOUT_S)
        except Exception:
            pass
        ray.kill(w.handle, no_restart=True)
        self.workers.pop(w.worker_id, None)

    async def _wait_drained(self, w: WorkerEntry) -> None:
        """Until ``w`` (out of the routing table) holds nothing for two checks in a row, is dead,
        or ``drain_timeout_s`` passed."""
        deadline = time.monotonic() + self.drain_timeout_s
        idle_checks = 0
        while idle_checks < 2 and time.monotonic() < deadline:
            await asyncio.sleep(1.0)  # longer than the router's table refresh
            try:
                s = await within(w.handle.status.remote(), timeout_s=PING_TIMEOUT_S)
            except Exception:
                break  # already dead
            idle_checks = 0 if s.busy else idle_checks + 1

    # --------------------------------------------------------------- health
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_health()
            except Exception:
                log.exception("health check failed")

    async def check_health(self) -> list[str]:
        """Ping every worker; replace the dead (in the background). Returns the ids found dead."""
        await self._resume()
        async with self._lock:
            live = [w for w in self.workers.values() if not w.draining]

            async def alive(w: WorkerEntry) -> bool:
                try:
                    await within(w.handle.ping.remote(), timeout_s=PING_TIMEOUT_S)
                    return True
                except Exception:
                    return False

            results = await asyncio.gather(*(alive(w) for w in live))
            dead = [w for w, ok in zip(live, results) if not ok]
            for w in dead:
                log.warning("worker %s is dead; replacing it", w.worker_id)
                self.workers.pop(w.worker_id, None)
                ray.kill(w.handle, no_restart=True)
                self.version += 1
                self.replacements += 1
            if not self._stopped:
                for task in self._reconcile():  # failures are logged and retried by _add's backoff
                    task.add_done_callback(lambda t: t.cancelled() or t.exception())
            return [w.worker_id for w in dead]

    async def stop(self) -> None:
        """Kill every actor (after the router stopped sending work)."""
        self._stopped = True
        if self._health is not None:
            self._health.cancel()
        self._stop_autoscaler()
        for w in list(self.workers.values()):
            try:
                await within(w.handle.shutdown.remote(), timeout_s=PING_TIMEOUT_S)
            except Exception:
                pass
            ray.kill(w.handle, no_restart=True)
        self.workers.clear()
        self.version += 1
        _save_targets(self.namespace, None)


def _targets_key(namespace: str) -> bytes:
    return f"splitserve/{namespace}/pool_targets".encode()


def _save_targets(namespace: str, targets: dict[str, int] | None) -> None:
    """Keep the pool targets where a restarted manager finds them (Ray's GCS key-value store)."""
    from ray.experimental import internal_kv

    if targets is None:
        internal_kv._internal_kv_del(_targets_key(namespace))
    else:
        internal_kv._internal_kv_put(_targets_key(namespace), ",".join(f"{k}={v}" for k, v in targets.items()))


def _load_targets(namespace: str) -> dict[str, int] | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_targets_key(namespace))
    if not raw:
        return None
    return {k: int(v) for k, v in (item.split("=") for item in raw.decode().split(","))}
