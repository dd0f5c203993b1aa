"""Same-node pairs through shared memory, the others through the configured backend.

:class:`NodeLocalTransport` is what a worker holds when ``kvtransfer.same_node``
is ``shm``: a :class:`~kvtransfer.shm_transport.ShmTransport` and the
configured (cross-node) transport side by side. Its endpoint is a
:class:`~kvtransfer.endpoints.NodeLocalEndpoint`: the cross-node backend's
endpoint (``remote``) and the shm one (``shm``, which names the node); for
each transfer, ``send`` and ``expect`` look at the peer's endpoint and pick
shared memory when the peer is on the same node (same node id, same kernel
and network namespace: :meth:`ShmTransport.shares_memory_with`), the
backend otherwise. Both sides apply the same rule to each other's endpoint,
so they always agree. The other calls go to whichever transport took the
transfer; leases, the secret and fault injection are each transport's own,
configured alike.
"""

from __future__ import annotations

import threading

import torch

from kvtransfer.base import KVTransport, TransferStatus
from kvtransfer.endpoints import Endpoint, NodeLocalEndpoint
from kvtransfer.shm_transport import ShmTransport


class NodeLocalTransport(KVTransport):
    """Routes each transfer to ``local`` (shared memory) or ``remote`` (see the module doc)."""

    def __init__(self, remote: KVTransport, local: ShmTransport) -> None:
        self.remote, self.local = remote, local
        self.worker_id = local.worker_id
        self._lock = threading.Lock()
        self._routes: dict[str, KVTransport] = {}

    def endpoint(self) -> NodeLocalEndpoint:
        return NodeLocalEndpoint(remote=self.remote.endpoint(), shm=self.local.endpoint())

    def path_for(self, peer: Endpoint) -> str:
        """``"shm"`` if transfers with ``peer`` go through shared memory, else the backend's name."""
        if isinstance(peer, NodeLocalEndpoint) and self.local.shares_memory_with(peer.shm):
            return "shm"
        return self.remote.endpoint().backend

    def _pick(self, transfer_id: str, peer: Endpoint) -> tuple[KVTransport, Endpoint]:
        if isinstance(peer, NodeLocalEndpoint):
            if self.path_for(peer) == "shm":
                return self.local, peer.shm
            return self.remote, peer.remote
        return self.remote, peer  # a peer without the shm half (same_node: backend)

    def _route(self, transfer_id: str) -> KVTransport:
        with self._lock:
            tr = self._routes.get(transfer_id)
        if tr is None:
            raise KeyError(f"unknown transfer {transfer_id!r} on {self.worker_id}")
        return tr

    def _register(self, transfer_id: str, tr: KVTransport) -> None:
        with self._lock:
            old = self._routes.get(transfer_id)
            if old is not None and old is not tr:
                # A live id on the other path: refuse as a single transport would.
                try:
                    live = not old.poll(transfer_id).done
                except KeyError:
                    live = False
                if live:
                    raise ValueError(f"transfer {transfer_id!r} already exists on {self.worker_id}")
                old.forget(transfer_id)
            self._routes[transfer_id] = tr

    # ---------------------------------------------------------- receiver side
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        tr, ep = self._pick(transfer_id, peer)
        self._register(transfer_id, tr)
        tr.expect(transfer_id, shape, dtype, ep, timeout_s)

    def result(self, transfer_id: str) -> torch.Tensor:
        tr = self._route(transfer_id)
        out = tr.result(transfer_id)
        self._drop(transfer_id, tr)
        return out

    # ------------------------------------------------------------ sender side
    def send(self, transfer_id: str, tensor: torch.Tensor, peer: Endpoint, timeout_s: float) -> None:
        tr, ep = self._pick(transfer_id, peer)
        self._register(transfer_id, tr)
        tr.send(transfer_id, tensor, ep, timeout_s)

    # ---------------------------------------------------------------- both
    def poll(self, transfer_id: str) -> TransferStatus:
        return self._route(transfer_id).poll(transfer_id)

    def error(self, transfer_id: str) -> str | None:
        return self._route(transfer_id).error(transfer_id)

    def abort(self, transfer_id: str) -> None:
        with self._lock:
            tr = self._routes.get(transfer_id)
        if tr is not None:
            tr.abort(transfer_id)

    def forget(self, transfer_id: str) -> None:
        with self._lock:
            tr = self._routes.get(transfer_id)
        if tr is not None:
            tr.forget(transfer_id)
            self._drop(transfer_id, tr)

    def _drop(self, transfer_id: str, tr: KVTransport) -> None:
        with self._lock:
            if self._routes.get(transfer_id) is tr:
                del self._routes[transfer_id]

    def stats(self) -> dict[str, int]:
        """Both transports' counters, added up (the same keys as any backend's)."""
        a, b = self.remote.stats(), self.local.stats()  # type: ignore[attr-defined]
        return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}

    def close(self) -> None:
        try:
            self.local.close()
        finally:
            self.remote.close()
