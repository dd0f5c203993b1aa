"""How many compute threads a worker's torch uses.

Ray starts an actor that asks for a fractional CPU with ``OMP_NUM_THREADS=1``,
so left alone a ``num_cpus: 0.5`` worker computes on one thread however idle
the machine is. Every worker therefore sets its thread count explicitly: the
pool's ``threads`` setting when given, else its CPU share rounded up, never
more than the machine's cores.
"""

from __future__ import annotations

import math
import os


def worker_threads(configured: int | None, cpu_share: float | None, machine_cores: int | None) -> int:
    """The thread count for a worker: ``configured`` as given, else ``ceil(cpu_share)``
    capped at ``machine_cores`` (all cores when the share is unknown or zero)."""
    if configured is not None:
        if configured < 1:
            raise ValueError(f"threads must be >= 1, got {configured}")
        return configured
    cores = max(1, machine_cores or 1)
    if cpu_share is None or cpu_share <= 0:
        return cores
    return max(1, min(cores, math.ceil(cpu_share)))


def ray_cpu_share() -> float | None:
    """The CPUs Ray assigned to this actor, or None outside a Ray actor."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - outside an actor (a driver, a test) there is no share to read
        return None


def apply_worker_threads(configured: int | None) -> int:
    """Set torch's intra-op threads for this worker process (see :func:`worker_threads`); return the count."""
    import torch

    n = worker_threads(configured, ray_cpu_share(), os.cpu_count())
    torch.set_num_threads(n)
    # OpenMP reads this only at start, but child libraries started later (and anyone reading the env) see it.
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n
