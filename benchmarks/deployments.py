"""A small local deployment: its config and a context manager that runs it.

The cluster benchmarks (``cluster_overhead``, ``soak``) and the integration
tests all run this same shape: half a CPU per worker, a few hundred KV blocks,
one router in this process on a random port (``router={"replicas": N}`` for
N router replica actors instead), and a Ray namespace of its own per config.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

from analysis.model_catalog import TINY_MODEL
from cluster.config import ClusterConfig, parse_config
from cluster.deployment import BackgroundDeployment
from kvtransfer.faults import TransferFaults

_namespaces = itertools.count()


def make_config(model: str = TINY_MODEL, backend: str = "gloo", ratio: str = "1:1", replicas: int = 2,
                router: dict | None = None, mode: str = "disaggregated", kvtransfer: dict | None = None,
                autoscale: dict | None = None, **pool_overrides) -> ClusterConfig:
    """A small deployment: random ports (metrics and the OpenAI HTTP API too), its own namespace.

    ``pool_overrides`` are ``prefill={...}`` / ``decode={...}`` fields laid
    over the pools' defaults; ``router`` and ``kvtransfer`` likewise;
    ``autoscale``: the ``pools.autoscale`` section (None: off).
    """
    data = {
        "model": {"name": model, "max_model_len": 1024},
        "pools": {
            "mode": mode,
            "ratio": ratio,
            "replicas": replicas,
            "prefill": {"num_cpus": 0.5, "num_blocks": 256, "batch_wait_ms": 2.0, **pool_overrides.get("prefill", {})},
            "decode": {"num_cpus": 0.5, "num_blocks": 512, "max_running": 32, **pool_overrides.get("decode", {})},
            **({"autoscale": autoscale} if autoscale is not None else {}),
        },
        "kvtransfer": {"backend": backend, "timeout_s": 30, "lease_s": 30.0, **(kvtransfer or {})},
        # One in-process router unless asked: the tests look inside it (and start faster).
        "router": {"host": "127.0.0.1", "port": 0, "policy": "least_loaded", "metrics_port": 0, "http_port": 0,
                   "drain_grace_s": 10, "replicas": 1, **(router or {})},
        "ray": {"namespace": f"small-{backend}-{next(_namespaces)}"},
    }
    return parse_config(data)


@contextmanager
def running(cfg: ClusterConfig,
            faults: TransferFaults | None = None) -> Iterator[tuple[BackgroundDeployment, str]]:
    """Start ``cfg`` in this process (router here, workers as Ray actors); yield it and the router's address.
    ``faults``: injected into every worker's KV transport (tests)."""
    d = BackgroundDeployment(cfg, faults)
    try:
        address = d.start()
        yield d, address
    finally:
        d.stop()
