"""In-process fake backend: transports in one process hand tensors over via a hub.

For unit tests of workers, routers and the lifecycle: no sockets, but the
same state machine, chunking, refusals, timeouts and faults as the real
backends. Lifecycle of one transfer:

1. The receiver ``expect``\\ s: it allocates the destination (WAITING).
2. The sender ``send``\\ s: a thread looks the receiver up in the hub
   (BOOTSTRAPPING), asks it to accept ``transfer_id`` (the receiver refuses
   a sender without the cluster secret's proof, ids it does not expect,
   from another sender, or of another size).
3. Chunks of ``chunk_bytes`` are copied straight into the destination
   (TRANSFERRING on both sides); either side's abort stops it at the next chunk.
4. The receiver checks that every byte came and both sides end SUCCESS.
"""

from __future__ import annotations

import threading

import torch

from kvtransfer.base import TransferStatus
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES, byte_view, chunk_ranges
from kvtransfer.endpoints import Endpoint, InProcEndpoint
from kvtransfer.faults import TransferFaults
from kvtransfer.transport_base import Transfer, TransportBase


class InProcHub:
    """Routes transfers between the :class:`InProcTransport` objects of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._transports: dict[str, InProcTransport] = {}

    def register(self, transport: InProcTransport) -> None:
        with self._lock:
            if transport.worker_id in self._transports:
                raise ValueError(f"worker {transport.worker_id!r} is already on this hub")
            self._transports[transport.worker_id] = transport

    def unregister(self, transport: InProcTransport) -> None:
        with self._lock:
            if self._transports.get(transport.worker_id) is transport:
                del self._transports[transport.worker_id]

    def lookup(self, worker_id: str) -> InProcTransport | None:
        with self._lock:
            return self._transports.get(worker_id)


class InProcTransport(TransportBase):
    """A :class:`~kvtransfer.base.KVTransport` whose peers live in the same process."""

    def __init__(self, hub: InProcHub, worker_id: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 faults: TransferFaults | None = None, secret: str | None = None) -> None:
        super().__init__(worker_id, faults, secret)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be > 0")
        self.chunk_bytes = chunk_bytes
        self._hub = hub
        hub.register(self)

    def endpoint(self) -> InProcEndpoint:
        return InProcEndpoint(worker_id=self.worker_id)

    # ---------------------------------------------------------- receiver side
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        self._new_transfer(transfer_id, "recv", peer, timeout_s, torch.empty(tuple(shape), dtype=dtype),
                           TransferStatus.WAITING)

    def _incoming(self, transfer_id: str, sender_id: str) -> tuple[Transfer | None, str | None]:
        t = self._find(transfer_id)
        if t is None or t.role != "recv":
            return None, f"refused by {self.worker_id}: transfer {transfer_id!r} is not expected"
        if t.peer.worker_id != sender_id:
            return None, f"refused by {self.worker_id}: {transfer_id!r} is expected from {t.peer.worker_id!r}"
        if self._expire(t) or t.status.done:
            return None, f"refused by {self.worker_id}: {transfer_id!r} is {t.status.name} ({t.error})"
        return t, None

    def _accept(self, transfer_id: str, sender_id: str, nbytes: int, proof: str | None = None) -> str | None:
        why = self._authenticate(transfer_id, sender_id, nbytes, proof)
        if why is not None:
            return why
        t, why = self._incoming(transfer_id, sender_id)
        if t is None:
            return why
        if nbytes != t.nbytes:
            why = f"size mismatch: sender has {nbytes} bytes, receiver expects {t.nbytes}"
            self._fail(t, why)
            return why
        t.scratch["accepted"] = True
        self._advance(t, TransferStatus.TRANSFERRING)
        return None

    def _write(self, transfer_id: str, sender_id: str, offset: int, data: torch.Tensor) -> str | None:
        t, why = self._incoming(transfer_id, sender_id)
        if t is None:
            return why
        if not t.scratch.get("accepted"):  # only what _accept let in (and authenticated) is written
            return f"refused by {self.worker_id}: {transfer_id!r} was not accepted"
        byte_view(t.tensor)[offset:offset + data.numel()].copy_(data)
        t.received += data.numel()
        self._count("recv", data.numel())
        return None

    def _finish(self, transfer_id: str, sender_id: str, error: str | None) -> str | None:
        t, why = self._incoming(transfer_id, sender_id)
        if t is None:
            return why
        if error is not None:
            self._fail(t, error)
            return error
        if t.received != t.nbytes:
            why = f"incomplete: {t.received} of {t.nbytes} bytes"
            self._fail(t, why)
            return why
        self._succeed(t)
        return None

    # ------------------------------------------------------------ sender side
    def send(self, transfer_id: str, tensor: torch.Tensor, peer: Endpoint, timeout_s: float) -> None:
        t = self._new_transfer(transfer_id, "send", peer, timeout_s, tensor.contiguous())
        self._spawn(self._run_send, t, name=f"send-{transfer_id}")

    def _run_send(self, t: Transfer) -> None:
        if not self._start_send_faults(t):
            return
        receiver = self._hub.lookup(t.peer.worker_id)
        if receiver is None:
            self._fail(t, f"no transport {t.peer.worker_id!r} on the hub")
            return
        self._advance(t, TransferStatus.TRANSFERRING)
        if t.scratch["drop"]:
            return  # nothing arrives, no ack comes: the deadline fails both sides
        tid, me = t.transfer_id, self.worker_id
        why = receiver._accept(tid, me, t.nbytes, self._proof(tid, t.nbytes))
        data = byte_view(t.tensor)
        for off, n in chunk_ranges(t.nbytes, self.chunk_bytes):
            if why is not None:
                break
            if self._expire(t) or t.status.done:  # aborted or timed out: tell the receiver
                receiver._finish(tid, me, f"sender {me}: {t.error}")
                return
            why = receiver._write(tid, me, off, data[off:off + n])
            self._count("send", n)
        why = why or receiver._finish(tid, me, None)
        if why is None:
            self._succeed(t)
        else:
            self._fail(t, why)

    def _close_backend(self) -> None:
        self._hub.unregister(self)
