"""The pool manager's routing table: which workers serve, where their KV transport listens, and the
pool targets. Produced by ``PoolManager.table()`` (a Ray actor call) and read by the router's directory,
``cluster.scale``, the soak benchmark and tests; one frozen value so that no reader guesses at keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtransfer.endpoints import Endpoint


@dataclass(frozen=True)
class TableWorker:
    """One live, non-draining worker.

    ``handle``: its Ray actor handle. ``endpoint``: how KV peers reach its transport.
    ``node_id``: the Ray node it runs on (shared-memory KV is chosen between workers of one node).
    """

    worker_id: str
    kind: str
    handle: Any
    endpoint: Endpoint
    node_id: str


@dataclass(frozen=True)
class RoutingTable:
    """``incarnation`` tells a recreated pool manager's tables apart (it counts ``version`` afresh).
    ``autoscale``: the autoscaler's ``AutoscaleReport``, or ``None`` without ``pools.autoscale``."""

    incarnation: str
    version: int
    targets: dict[str, int]
    workers: tuple[TableWorker, ...]
    autoscale: Any = None

    def of_kind(self, kind: str) -> list[TableWorker]:
        return [w for w in self.workers if w.kind == kind]

    def worker_ids(self, kind: str | None = None) -> set[str]:
        return {w.worker_id for w in self.workers if kind is None or w.kind == kind}
