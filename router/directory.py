"""The router's view of the pools: worker handles, endpoints and load,
refreshed from the pool manager and from the workers' own status.

The table is a cache: while the pool manager is unreachable (dead, being
restarted or recreated) the router keeps routing to the workers it knows and
keeps polling their status; it finds the manager again by name."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from kvtransfer.endpoints import Endpoint
from router.policy import WorkerLoad
from router.prefix_index import PrefixIndex, PrefixQuery
from worker_common.routing_table import RoutingTable
from worker_common.timeouts import within
from worker_common.worker_status import WorkerStatus

log = logging.getLogger(__name__)
STATUS_TIMEOUT_S = 5.0


@dataclass
class WorkerInfo:
    worker_id: str
    kind: str
    handle: Any
    endpoint: Endpoint
    node_id: str
    status: WorkerStatus | None = None  # the last status it reported; None until the first poll answers
    alive: bool = False  # whether the last status poll was answered
    # Work the router itself has placed there and not yet seen finish (prompt
    # tokens not cached there, tokens to generate), counted from the moment it
    # chose the worker: fresher than the polled status, so that a burst of
    # requests spreads out before the next poll.
    inflight_tokens: int = 0
    # time.monotonic() when the poll that answered ``status`` was sent, and when this router last
    # released work there: a status asked before that release may still count that work as running.
    status_asked_at: float = 0.0
    released_at: float = 0.0

    def charge(self, tokens: int) -> None:
        """Count ``tokens`` of work this router has just placed here."""
        self.inflight_tokens += tokens

    def release(self, tokens: int) -> None:
        """Stop counting ``tokens`` placed by :meth:`charge` (the work ended, or never started)."""
        self.inflight_tokens -= tokens
        self.released_at = time.monotonic()

    def load(self, cached_tokens: int = 0) -> WorkerLoad:
        """Its load as the policies see it; ``cached_tokens``: of the request being placed."""
        return WorkerLoad(
            self.worker_id,
            outstanding_tokens=self.inflight_tokens,
            free_blocks=self.status.free_blocks if self.status else 0,
            num_blocks=self.status.num_blocks if self.status else 1,
            cached_tokens=cached_tokens,
        )


class WorkerDirectory:
    """Refreshes from the pool manager every ``refresh_s`` seconds.

    ``find_pool_manager``: returns the pool manager's current handle (by name);
    called when the one held stops answering (it may have been recreated).
    """

    def __init__(self, pool_manager: Any, refresh_s: float = 0.5,
                 find_pool_manager: Callable[[], Any] | None = None) -> None:
        self.pool_manager = pool_manager
        self.find_pool_manager = find_pool_manager
        self.refresh_s = refresh_s
        self.table_failures = 0  # refreshes in a row that could not reach the pool manager
        self.workers: dict[str, WorkerInfo] = {}
        self.targets: dict[str, int] = {}
        self.autoscale: Any = None  # the pool manager's AutoscaleReport (None without pools.autoscale)
        self.version: tuple[str, int] | None = None  # (the manager's incarnation, its table version)
        self.prefix_index = PrefixIndex()  # what each worker's prefix cache holds, from its status
        self._task: asyncio.Task | None = None

    def of_kind(self, kind: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.kind == kind]

    def loads(self, workers: list[WorkerInfo], query: PrefixQuery | None = None) -> list[WorkerLoad]:
        """The policies' view of ``workers``, each with the tokens of ``query`` it reported cached."""
        return [w.load(self.prefix_index.cached_tokens(w.worker_id, query) if query else 0) for w in workers]

    async def refresh(self) -> None:
        """Fetch the table (keeping the cached one if the pool manager is unreachable), then poll status."""
        try:
            await self.refresh_table()
        except Exception as e:
            self.table_failures += 1
            log.warning("pool manager unreachable (%s); routing with the %d workers known", e, len(self.workers))
            if self.find_pool_manager is not None:
                try:
                    self.pool_manager = await asyncio.to_thread(self.find_pool_manager)
                except Exception:
                    pass  # not back yet
            if self.version is None:
                raise  # no table ever: nothing to route with
        await self.poll_status()

    async def refresh_table(self) -> None:
        table: RoutingTable = await within(self.pool_manager.table.remote(), timeout_s=STATUS_TIMEOUT_S)
        self.table_failures = 0
        self.targets = table.targets
        self.autoscale = table.autoscale
        # A recreated manager counts versions afresh: its incarnation tells its tables apart.
        version = (table.incarnation, table.version)
        if version != self.version:
            fresh = {}
            for w in table.workers:
                old = self.workers.get(w.worker_id)
                if old is not None and (old.kind, old.endpoint) != (w.kind, w.endpoint):
                    old = None  # it switched role in place: another kind, a new transport
                fresh[w.worker_id] = old or WorkerInfo(w.worker_id, w.kind, w.handle, w.endpoint, w.node_id)
            for gone in set(self.workers) - set(fresh):
                self.prefix_index.forget(gone)
            self.workers = fresh
            self.version = version

    async def poll_status(self) -> None:
        async def one(w: WorkerInfo) -> None:
            try:
                asked = time.monotonic()
                w.status = await within(w.handle.status.remote(), timeout_s=STATUS_TIMEOUT_S)
                w.status_asked_at = asked
                w.alive = True
            except Exception:
                w.alive = False
                self.prefix_index.forget(w.worker_id)  # a dead worker's cache is gone with it
                return
            c = w.status.prefix_cache
            self.prefix_index.update(w.worker_id, c.enabled, c.block_size, c.cache_key, c.block_hashes)

        await asyncio.gather(*(one(w) for w in list(self.workers.values())))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("directory refresh failed")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
