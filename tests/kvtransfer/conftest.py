"""Fixtures of the kvtransfer tests: one factory of transports per backend.

``make_transport_for`` (parametrized as ``make``) builds transports of the
backend under test and closes them after the test:

- ``inproc``, ``gloo``, ``grpc``: transports in this process (threads).
- ``ray``: each transport lives in its own Ray actor (the receiver must).
- ``gloo-actors``: gloo transports each in its own Ray actor process, so
  sender and receiver are separate processes, as deployed.
- ``nccl``: two CUDA devices in this process; skipped without them.
- ``shm``: shared-memory transports in this process; ``shm-actors``: each in
  its own Ray actor process. After every shm test, once its transports are
  closed, no shared-memory buffer of ours is left mapped or open in any of
  those processes, and nothing of ours is in ``/dev/shm``.

One local Ray cluster (2 CPUs, 127.0.0.1, token auth) serves the whole
session, started only if a Ray-backed test runs. Every test also checks that
no transport thread outlives it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtransfer.base import KVTransport
from kvtransfer.faults import TransferFaults
from kvtransfer.grpc_transport import GrpcTransport
from kvtransfer.inproc import InProcHub, InProcTransport
from kvtransfer.shm_transport import ShmTransport
from kvtransfer.torch_dist import TorchDistTransport

from .helpers import MakeTransport, needs_two_gpus, shm_leftovers
from .ray_hosts import RAY_NAMESPACE

REPO_ROOT = Path(__file__).resolve().parents[2]
N_HOSTS = 3
ACTOR_START_TIMEOUT_S = 300.0

BACKENDS = [
    pytest.param("inproc"),
    pytest.param("gloo"),
    pytest.param("grpc"),
    pytest.param("ray"),
    pytest.param("gloo-actors"),
    pytest.param("nccl", marks=needs_two_gpus),
    pytest.param("shm"),
    pytest.param("shm-actors"),
]
ACTOR_BACKENDS = {"ray": "ray", "gloo-actors": "gloo", "shm-actors": "shm"}


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every transport thread (named ``kvt-*``) must be gone after the test."""
    yield
    deadline = time.monotonic() + 10.0
    while True:
        left = [t.name for t in threading.enumerate() if t.name.startswith("kvt-")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"transport threads outlived the test: {left}"


@pytest.fixture(scope="session")
def ray_hosts() -> Iterator[list[Any]]:
    """A local Ray cluster for the session and a few transport-hosting actors."""
    import ray

    from cluster.local_ray import init_private_cluster
    from tests.kvtransfer.ray_hosts import TransportHost

    started = not ray.is_initialized()
    if started:
        init_private_cluster(RAY_NAMESPACE, 2, tries=2, configure_logging=False)
    # PYTHONPATH per actor: it also holds on a cluster that someone else's ray.init() started.
    env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "token"}}
    hosts = [TransportHost.options(name=f"kvt-host-{i}", namespace=RAY_NAMESPACE, runtime_env=env).remote()
             for i in range(N_HOSTS)]
    # Starting 3 worker processes that import torch takes ~7 s here, minutes on a loaded box.
    ray.get([h.pid.remote() for h in hosts], timeout=ACTOR_START_TIMEOUT_S)
    yield hosts
    for h in hosts:
        ray.kill(h)
    if started:
        ray.shutdown()


def _kwargs(backend: str, chunk_bytes: int, faults: TransferFaults | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"faults": faults}
    if backend != "ray":
        kw["chunk_bytes"] = chunk_bytes
    if backend in ("gloo", "gloo-actors", "nccl"):
        kw["expect_grace_s"] = 0.5  # refusals of unknown transfers come fast in tests
    return kw


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest) -> Iterator[MakeTransport]:
    """``make(faults=None, chunk_bytes=1 MiB) -> KVTransport`` for the backend under test."""
    backend: str = request.param
    hub, created, ids = InProcHub(), [], itertools.count()
    hosts: list[Any] = request.getfixturevalue("ray_hosts") if backend in ACTOR_BACKENDS else []

    def make_one(faults: TransferFaults | None = None, chunk_bytes: int = 1 << 20) -> KVTransport:
        n = next(ids)
        wid, kw = f"{backend}-w{n}", _kwargs(backend, chunk_bytes, faults)
        tr: KVTransport
        if backend == "inproc":
            tr = InProcTransport(hub, wid, **kw)
        elif backend == "gloo":
            tr = TorchDistTransport(wid, "gloo", **kw)
        elif backend == "nccl":
            if n >= torch.cuda.device_count():  # NCCL refuses two ranks of one group on one GPU
                pytest.skip("this test needs one GPU per nccl transport")
            tr = TorchDistTransport(wid, "nccl", device=f"cuda:{n}", **kw)
        elif backend == "grpc":
            tr = GrpcTransport(wid, **kw)
        elif backend == "shm":
            tr = ShmTransport(wid, **kw)
        else:
            import ray

            from tests.kvtransfer.ray_hosts import CALL_TIMEOUT_S, ActorTransport

            assert n < len(hosts), "a test may use at most N_HOSTS actor-hosted transports"
            tr = ActorTransport(hosts[n], ray.get(hosts[n].open.remote(ACTOR_BACKENDS[backend], wid, kw),
                                                  timeout=CALL_TIMEOUT_S))
        created.append(tr)
        return tr

    make_one.backend = backend  # type: ignore[attr-defined]
    yield make_one
    for tr in created:
        tr.close()
    n_created = len(created)
    created.clear()  # closed and dropped: whatever they held must be gone now
    if backend == "shm":
        assert shm_leftovers() == [], "shared-memory buffers outlived their transports"
    elif backend == "shm-actors":
        import ray

        from tests.kvtransfer.ray_hosts import CALL_TIMEOUT_S

        left = ray.get([h.shm_leftovers.remote() for h in hosts[:n_created]], timeout=CALL_TIMEOUT_S)
        assert left == [[]] * n_created, "shared-memory buffers outlived their transports"
