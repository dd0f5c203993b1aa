"""Routing policies: which prefill and which decode worker get a request.

Torch- and Ray-free. A policy ranks candidates; the router tries them in
order (a decode worker may refuse a reservation when it is full).
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


def make_policy(name: str) -> RoutingPolicy:
    policies = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}
    if name not in policies:
        raise ValueError(f"router.policy must be one of {sorted(policies)}, got {name!r}")
    return policies[name]()
