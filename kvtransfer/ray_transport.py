"""Ray backend: the KV travels through the Ray object store.

The receiving transport lives inside a named Ray actor that exposes
``kvtransfer_deliver`` (mix in :class:`KVTransferActorMixin`); its endpoint
carries the actor's name and namespace. Lifecycle of one transfer:

1. The receiver ``expect``\\ s: it allocates the destination (WAITING).
2. The sender ``send``\\ s: a thread ``ray.put``\\ s the payload as a flat
   uint8 numpy array (BOOTSTRAPPING while it looks up the actor, then
   TRANSFERRING) and calls ``actor.kvtransfer_deliver.remote(id, [ref])``.
   The ref is wrapped in a list so Ray hands the receiver the *reference*
   (the receiver becomes a borrower that keeps the object alive) instead of
   resolving it before the call.
3. ``deliver`` refuses ids it does not expect (the call raises, the sender
   ends FAILED); otherwise it returns at once and a thread fetches the object
   with ``ray.get(ref, timeout=...)``, checks its type and size, and copies
   it into the destination (SUCCESS).
4. The sender is SUCCESS when the receiver accepted the delivery.

Ray's own serialization carries the object (inside the cluster's trust
boundary); we only ever put a plain uint8 array and check the type we get.

With a cluster secret (see :mod:`kvtransfer.push_proof`) the sender passes its
proof to ``kvtransfer_deliver`` and the receiver checks it before anything
else, in particular before ``ray.get`` deserializes the object. This is
defence in depth: whoever may call a Ray actor's methods can already run
code in the cluster, so Ray's own authentication (``RAY_AUTH_MODE=token``)
and a private network are what guard this plane first.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import ray
import torch

from kvtransfer.base import TransferError, TransferStatus
from kvtransfer.chunking import byte_view
from kvtransfer.endpoints import Endpoint, RayEndpoint, narrow
from kvtransfer.faults import TransferFaults
from kvtransfer.transport_base import Transfer, TransportBase

_POLL_S = 0.05  # how often a waiting sender checks for abort/deadline


class RayTransport(TransportBase):
    """KV transfer through the Ray object store (see the module doc).

    ``actor_name``/``namespace`` name the actor hosting this transport; inside
    a named actor they default to that actor's. Without a name the transport
    can send but nobody can deliver to it. ``secret``: the cluster secret this
    side proves and demands (module doc).
    """

    def __init__(self, worker_id: str, *, actor_name: str | None = None, namespace: str | None = None,
                 faults: TransferFaults | None = None, secret: str | None = None) -> None:
        super().__init__(worker_id, faults, secret)
        if actor_name is None and ray.is_initialized():
            ctx = ray.get_runtime_context()
            actor_name = ctx.get_actor_name() if ctx.get_actor_id() else None
            namespace = namespace or ctx.namespace
        self.actor_name = actor_name
        self.namespace = namespace
        self._actors: dict[tuple[str, str | None], Any] = {}
        self._actors_lock = threading.Lock()

    def endpoint(self) -> RayEndpoint:
        return RayEndpoint(worker_id=self.worker_id, actor_name=self.actor_name, namespace=self.namespace)

    # ---------------------------------------------------------- receiver side
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        if not self.actor_name:
            raise RuntimeError(f"RayTransport {self.worker_id} has no actor name: peers cannot deliver to it")
        self._new_transfer(transfer_id, "recv", peer, timeout_s, torch.empty(tuple(shape), dtype=dtype),
                           TransferStatus.WAITING)

    def deliver(self, transfer_id: str, refs: list[ray.ObjectRef], sender_id: str | None = None,
                nbytes: int | None = None, proof: str | None = None) -> None:
        """Accept ``refs[0]`` for ``transfer_id`` and fetch it in the background.

        Raises :class:`TransferError` (which fails the sender's actor call) if
        the sender's ``proof`` of the cluster secret is missing or wrong (this
        also fails the receiver's side), the transfer is not expected here, is
        expected from another sender, has another size (this also fails the
        receiver's side), or is already receiving or finished.
        """
        why = self._authenticate(transfer_id, str(sender_id or ""), -1 if nbytes is None else int(nbytes), proof)
        if why is not None:
            raise TransferError(why)
        t = self._find(transfer_id)
        if t is None or t.role != "recv":
            raise TransferError(f"refused by {self.worker_id}: transfer {transfer_id!r} is not expected")
        if sender_id is not None and t.peer.worker_id != sender_id:
            raise TransferError(f"refused by {self.worker_id}: {transfer_id!r} is expected from "
                                f"{t.peer.worker_id!r}, not {sender_id!r}")
        if len(refs) != 1:
            raise TransferError(f"refused by {self.worker_id}: expected one object ref, got {len(refs)}")
        with self._lock:
            if self._expire(t) or t.status != TransferStatus.WAITING:
                raise TransferError(f"refused by {self.worker_id}: {transfer_id!r} is {t.status.name} ({t.error})")
            if nbytes is not None and nbytes != t.nbytes:
                why = f"size mismatch: sender has {nbytes} bytes, receiver expects {t.nbytes}"
                self._fail(t, why)
                raise TransferError(f"refused by {self.worker_id}: {why}")
            t.status = TransferStatus.TRANSFERRING
        self._spawn(self._fetch, t, refs[0], name=f"fetch-{transfer_id}")

    def _fetch(self, t: Transfer, ref: ray.ObjectRef) -> None:
        try:
            arr = ray.get(ref, timeout=max(t.remaining(), 0.001))
        except Exception as e:  # GetTimeoutError, OwnerDiedError, ObjectLostError...
            self._fail(t, f"fetch failed: {type(e).__name__}: {e}")
            return
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.nbytes != t.nbytes:
            got = f"{type(arr).__name__} {getattr(arr, 'dtype', '')} {getattr(arr, 'nbytes', '?')} bytes"
            self._fail(t, f"bad payload: got {got}, expected {t.nbytes} uint8 bytes")
            return
        with self._lock:
            if t.status.done:  # aborted or timed out while fetching: keep the buffer untouched
                return
        np.copyto(byte_view(t.tensor).numpy(), arr.reshape(-1))
        self._count("recv", t.nbytes)
        self._succeed(t)

    # ------------------------------------------------------------ sender side
    def send(self, transfer_id: str, tensor: torch.Tensor, peer: Endpoint, timeout_s: float) -> None:
        t = self._new_transfer(transfer_id, "send", peer, timeout_s, tensor.contiguous())
        self._spawn(self._run_send, t, name=f"send-{transfer_id}")

    @staticmethod
    def _actor_key(peer: RayEndpoint) -> tuple[str, str | None]:
        return str(peer.actor_name), peer.namespace

    def _actor(self, peer: RayEndpoint) -> Any:
        key = self._actor_key(peer)
        with self._actors_lock:
            if key not in self._actors:
                self._actors[key] = ray.get_actor(key[0], namespace=key[1])
            return self._actors[key]

    def _run_send(self, t: Transfer) -> None:
        if not self._start_send_faults(t):
            return
        try:
            peer = narrow(t.peer, RayEndpoint)
            actor = self._actor(peer)
        except Exception as e:  # ValueError when no such actor or on another backend's endpoint
            self._fail(t, f"cannot find the actor of {t.peer}: {type(e).__name__}: {e}")
            return
        self._advance(t, TransferStatus.TRANSFERRING)
        ref = ray.put(byte_view(t.tensor.cpu()).numpy())
        self._count("send", t.nbytes)
        if t.scratch["drop"]:
            return  # the object is never delivered: the deadline fails both sides
        call = actor.kvtransfer_deliver.remote(t.transfer_id, [ref], self.worker_id, t.nbytes,
                                               self._proof(t.transfer_id, t.nbytes))
        while not t.status.done and t.remaining() > 0:
            ready, _ = ray.wait([call], timeout=min(_POLL_S, max(t.remaining(), 0.0)))
            if not ready:
                continue
            try:
                ray.get(call, timeout=max(t.remaining(), 0.001))
            except Exception as e:  # the receiver refused (TransferError) or died
                if not isinstance(e, TransferError):  # a dead actor's handle is not reused
                    with self._actors_lock:
                        self._actors.pop(self._actor_key(peer), None)
                self._fail(t, f"peer refused: {type(e).__name__}: {e}")
                return
            self._succeed(t)
            return
        self._expire(t)

    def _close_backend(self) -> None:
        with self._actors_lock:
            self._actors.clear()


class KVTransferActorMixin:
    """Mix into a Ray actor class that keeps its transport in ``self.kv_transport``.

    Gives the actor the ``kvtransfer_deliver`` method that senders'
    :class:`RayTransport` call (also when the Ray transport is the cross-node
    half of a :class:`~kvtransfer.node_local.NodeLocalTransport`). It returns at once (the fetch runs in a
    background thread), so it does not hold up the actor's other calls.
    """

    kv_transport: Any

    def kvtransfer_deliver(self, transfer_id: str, refs: list[ray.ObjectRef], sender_id: str | None = None,
                           nbytes: int | None = None, proof: str | None = None) -> None:
        # A NodeLocalTransport keeps the cross-node transport as ``remote``.
        tr = getattr(self.kv_transport, "remote", self.kv_transport)
        if not isinstance(tr, RayTransport):
            raise TransferError(f"this actor's transport is {type(tr).__name__}, not RayTransport")
        tr.deliver(transfer_id, refs, sender_id, nbytes, proof)
