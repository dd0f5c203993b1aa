"""Build a transport from a backend name (what the YAML's ``kvtransfer.backend`` says).

Imports are lazy so that, e.g., a worker configured for gRPC never imports
Ray's transport and a CPU-only host never touches NCCL.
"""

from __future__ import annotations

from typing import Any

from kvtransfer.base import KVTransport

BACKENDS = ("gloo", "nccl", "grpc", "ray", "inproc")


def make_transport(backend: str, worker_id: str, **kwargs: Any) -> KVTransport:
    """A :class:`KVTransport` of ``backend`` for ``worker_id``.

    ``kwargs`` go to the backend's constructor: ``host``, ``port``,
    ``chunk_bytes``, ``faults``, ``secret`` ... (``device`` for nccl, which
    defaults to ``cuda``; ``stream_idle_s`` and ``max_streams_per_peer`` for
    grpc); ``inproc`` needs ``hub=InProcHub()`` shared by its peers. ``secret`` (every backend): the cluster secret; with one, the
    transport accepts only transfers whose sender proves it holds the same
    secret (see :mod:`kvtransfer.push_proof`). None (the default) accepts any.
    """
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
