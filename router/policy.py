"""Routing policies: which prefill and which decode worker get a request.

Torch- and Ray-free. A policy ranks candidates; the router tries them in
order (a decode worker may refuse a reservation when it is full).

``prefix_aware`` weighs the tokens of the request a worker already caches
(from the router's :class:`~router.prefix_index.PrefixIndex`) against its
load, both in tokens::

    cost = outstanding_tokens - cache_weight * cached_tokens

lowest first, ties to the larger free share of KV blocks. On a prefill
worker a cached token is a token it does not compute; on a decode worker, a
token whose KV is not moved (nor computed, on the decode-only path). With
``cache_weight`` 1 a worker holding a 1,000-token prefix wins over an idle
one until it has 1,000 more tokens in flight; 0 is ``least_loaded``.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoad:
    """What the router knows of one worker's load."""

    worker_id: str
    outstanding_tokens: int = 0  # prompt tokens queued (prefill) / tokens still to generate (decode)
    free_blocks: int = 0
    num_blocks: int = 1
    cached_tokens: int = 0  # leading tokens of the request being placed that the worker reported cached


class RoutingPolicy(ABC):
    @abstractmethod
    def rank(self, workers: list[WorkerLoad]) -> list[str]:
        """Worker ids, most preferred first."""


class RoundRobin(RoutingPolicy):
    """Rotate through the workers, whatever their load."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def rank(self, workers: list[WorkerLoad]) -> list[str]:
        if not workers:
            return []
        ids = sorted(w.worker_id for w in workers)
        start = next(self._counter) % len(ids)
        return ids[start:] + ids[:start]


class LeastLoaded(RoutingPolicy):
    """Fewest outstanding tokens first; ties go to the larger free fraction of KV blocks."""

    def rank(self, workers: list[WorkerLoad]) -> list[str]:
        ordered = sorted(workers, key=lambda w: (w.outstanding_tokens, -w.free_blocks / max(w.num_blocks, 1), w.worker_id))
        return [w.worker_id for w in ordered]


class PrefixAware(RoutingPolicy):
    """Lowest ``outstanding_tokens - cache_weight * cached_tokens`` first (module docstring)."""

    def __init__(self, cache_weight: float = 1.0) -> None:
        if not cache_weight >= 0:
            raise ValueError(f"cache_weight must be >= 0, got {cache_weight}")
        self.cache_weight = cache_weight

    def cost(self, w: WorkerLoad) -> float:
        return w.outstanding_tokens - self.cache_weight * w.cached_tokens

    def rank(self, workers: list[WorkerLoad]) -> list[str]:
        ordered = sorted(workers, key=lambda w: (self.cost(w), -w.free_blocks / max(w.num_blocks, 1), w.worker_id))
        return [w.worker_id for w in ordered]


POLICIES = ("round_robin", "least_loaded", "prefix_aware")


def make_policy(name: str, cache_weight: float = 1.0) -> RoutingPolicy:
    """The policy named ``name`` (one of :data:`POLICIES`); ``cache_weight`` is ``prefix_aware``'s."""
    if name not in POLICIES:
        raise ValueError(f"router.policy must be one of {sorted(POLICIES)}, got {name!r}")
    if name == "prefix_aware":
        return PrefixAware(cache_weight)
    return RoundRobin() if name == "round_robin" else LeastLoaded()
