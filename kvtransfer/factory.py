"""Build a transport from a backend name (what the YAML's ``kvtransfer.backend`` says).

Imports are lazy so that, e.g., a worker configured for gRPC never imports
Ray's transport and a CPU-only host never touches NCCL.
"""

from __future__ import annotations

from typing import Any

from kvtransfer.base import KVTransport
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES
from kvtransfer.shm_settings import DEFAULT_SHM_POOL_BYTES, SAME_NODE_MODES

BACKENDS = ("gloo", "nccl", "grpc", "ray", "inproc", "shm")


def make_transport(backend: str, worker_id: str, *, same_node: str = "backend", node_id: str | None = None,
                   shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES, **kwargs: Any) -> KVTransport:
    """A :class:`KVTransport` of ``backend`` for ``worker_id``.

    ``kwargs`` go to the backend's constructor: ``host``, ``port``,
    ``chunk_bytes``, ``faults``, ``secret`` ... (``device`` for nccl, which
    defaults to ``cuda``; ``stream_idle_s`` and ``max_streams_per_peer`` for
    grpc); ``inproc`` needs ``hub=InProcHub()`` shared by its peers. ``secret`` (every backend): the cluster secret; with one, the
    transport accepts only transfers whose sender proves it holds the same
    secret (see :mod:`kvtransfer.push_proof`). None (the default) accepts any.

    ``same_node="shm"``: peers on this node (``node_id``, the Ray node id)
    get their KV through shared memory, the others through ``backend``
    (:class:`~kvtransfer.node_local.NodeLocalTransport`); not with ``nccl``
    (GPU KV) or ``inproc``, which stay as they are. ``backend="shm"``
    alone reaches only peers on this node. ``shm_pool_bytes``: the shared-memory
    receiver's buffer pool (:mod:`kvtransfer.shm_buffers`).
    """
    if same_node not in SAME_NODE_MODES:
        raise ValueError(f"same_node must be one of {', '.join(SAME_NODE_MODES)}, not {same_node!r}")
    # nccl keeps its pairs: its KV lives in GPU memory, which NCCL moves between GPUs of one node directly.
    if backend == "shm" or (same_node == "shm" and backend not in ("inproc", "nccl")):
        from kvtransfer.shm_transport import ShmTransport

        shm_kwargs = {k: kwargs[k] for k in ("faults", "secret") if k in kwargs}
        local = ShmTransport(worker_id, node_id=node_id, pool_bytes=shm_pool_bytes,
                             chunk_bytes=kwargs.get("chunk_bytes", DEFAULT_CHUNK_BYTES), **shm_kwargs)
        if backend == "shm":
            return local
        from kvtransfer.node_local import NodeLocalTransport

        try:
            return NodeLocalTransport(_make(backend, worker_id, kwargs), local)
        except BaseException:
            local.close()
            raise
    return _make(backend, worker_id, kwargs)


def _make(backend: str, worker_id: str, kwargs: dict[str, Any]) -> KVTransport:
    if backend in ("gloo", "nccl"):
        from kvtransfer.torch_dist import TorchDistTransport

        if backend == "nccl":
            kwargs.setdefault("device", "cuda")
        return TorchDistTransport(worker_id, backend, **kwargs)
    if backend == "grpc":
        from kvtransfer.grpc_transport import GrpcTransport

        return GrpcTransport(worker_id, **kwargs)
    if backend == "ray":
        from kvtransfer.ray_transport import RayTransport

        return RayTransport(worker_id, **kwargs)
    if backend == "inproc":
        from kvtransfer.inproc import InProcHub, InProcTransport

        hub = kwargs.pop("hub", None)
        if not isinstance(hub, InProcHub):
            raise ValueError("the inproc backend needs hub=InProcHub() shared by the transports")
        return InProcTransport(hub, worker_id, **kwargs)
    raise ValueError(f"unknown kvtransfer backend {backend!r}; choose one of {', '.join(BACKENDS)}")
