"""gRPC backend: the sender streams raw KV bytes to the receiver's gRPC server.

Every transport runs a small sync gRPC server (service
``splitserve.kvtransfer.v1.KvTransfer`` in ``protos/kvtransfer.proto``) and
keeps one channel per peer. Lifecycle of one transfer:

1. The receiver ``expect``\\ s: it allocates the destination (WAITING).
2. The sender ``send``\\ s: a thread opens (or reuses) the channel to the
   peer's endpoint and starts the client-streaming ``Push`` with the
   transfer's remaining time as the RPC deadline (BOOTSTRAPPING until the
   connection is up, then TRANSFERRING).
3. Chunks of at most ``min(sender chunk_bytes, receiver max_chunk_bytes)``
   flow in order; the receiver copies each straight into the destination with
   ``numpy.frombuffer`` (raw bytes, never unpickled) and checks transfer id,
   offset and total size. A chunk for a transfer it does not expect, from a
   sender it does not expect, after an abort, or past the deadline is
   refused with ``PushAck(ok=false)`` and the sender ends FAILED.
4. At the end of the stream the receiver checks that every byte came
   (SUCCESS) and acknowledges; the sender is SUCCESS on ``ok=true``.
   A sender abort cancels the RPC; the receiver sees the broken stream.

With a cluster secret (see :mod:`kvtransfer.push_proof`) the sender's proof
travels in the ``kv-proof`` metadata of the stream and the receiver checks
it against the first chunk's transfer id and size before it looks at
anything else; the chunks that follow belong to the same authenticated
stream. The channel itself is plaintext: the secret authenticates pushes,
it does not hide or sign the KV bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import torch

from kvtransfer.base import Endpoint, TransferStatus
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES, byte_view, chunk_ranges
from kvtransfer.faults import TransferFaults
from kvtransfer.transport_base import Transfer, TransportBase
from protos import kvtransfer_pb2, kvtransfer_pb2_grpc

# Room for the KvChunk fields around `data` in one gRPC message.
_MESSAGE_OVERHEAD = 64 << 10
_SENDER_KEY = "kv-sender"  # metadata: who pushes, checked against expect(peer=...)
_PROOF_KEY = "kv-proof"  # metadata: the sender's proof that it holds the cluster secret


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Servicer(kvtransfer_pb2_grpc.KvTransferServicer):
    def __init__(self, transport: GrpcTransport) -> None:
        self._transport = transport

    def Push(self, request_iterator: Iterator[kvtransfer_pb2.KvChunk],
             context: grpc.ServicerContext) -> kvtransfer_pb2.PushAck:
        metadata = dict(context.invocation_metadata())
        sender, proof = str(metadata.get(_SENDER_KEY, "")), metadata.get(_PROOF_KEY)
        t: Transfer | None = None
        try:
            for chunk in request_iterator:
                if t is None:
                    t, why = self._transport._begin(chunk, sender, proof)
                else:
                    why = self._transport._write(t, chunk)
                if why is not None:
                    return kvtransfer_pb2.PushAck(ok=False, error=why)
        except Exception as e:  # the sender cancelled or the stream broke
            if t is not None:
                self._transport._fail(t, f"stream from {sender} broke: {e}")
            return kvtransfer_pb2.PushAck(ok=False, error=f"stream broke: {e}")
        if t is None:
            return kvtransfer_pb2.PushAck(ok=False, error="empty stream")
        why = self._transport._finish(t)
        return kvtransfer_pb2.PushAck(ok=why is None, error=why or "")


class GrpcTransport(TransportBase):
    """KV transfer over a client-streaming gRPC call (see the module doc).

    ``host``/``port`` are where this transport's server listens (port 0 picks
    a free port; :meth:`endpoint` publishes the one bound). ``chunk_bytes``
    is both the largest chunk this side sends and the largest it accepts.
    ``secret``: the cluster secret this side proves and demands (module doc).
    """

    def __init__(self, worker_id: str, host: str = "127.0.0.1", port: int = 0, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_workers: int = 16,
                 faults: TransferFaults | None = None, secret: str | None = None) -> None:
        super().__init__(worker_id, faults, secret)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be > 0")
        self.chunk_bytes = chunk_bytes
        self.host = host
        limit = chunk_bytes + _MESSAGE_OVERHEAD
        self._executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"kvt-grpc-{worker_id}")
        self._server = grpc.server(
            self._executor,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 1 << 20),
                     # Two servers must never silently share a fixed port.
                     ("grpc.so_reuseport", 0)])
        kvtransfer_pb2_grpc.add_KvTransferServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port(_target(host, port))
        if not self.port:
            raise RuntimeError(f"gRPC transport {worker_id} could not bind {_target(host, port)}")
        self._server.start()
        self._channels: dict[str, tuple[grpc.Channel, kvtransfer_pb2_grpc.KvTransferStub]] = {}
        self._channels_lock = threading.Lock()

    def endpoint(self) -> Endpoint:
        return {"worker_id": self.worker_id, "backend": "grpc", "host": self.host, "port": self.port,
                "max_chunk_bytes": self.chunk_bytes}

    # ---------------------------------------------------------- receiver side
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        t = self._new_transfer(transfer_id, "recv", peer, timeout_s, torch.empty(tuple(shape), dtype=dtype),
                               TransferStatus.WAITING)
        t.scratch["dst"] = byte_view(t.tensor).numpy()  # numpy view: a copy target with no torch warning

    def _begin(self, chunk: kvtransfer_pb2.KvChunk, sender: str,
               proof: object = None) -> tuple[Transfer | None, str | None]:
        """First chunk of a stream: is the sender authenticated, and this transfer expected, from it, of this size?"""
        why = self._authenticate(chunk.transfer_id, sender, chunk.total_bytes, proof)
        if why is not None:
            return None, why
        t = self._find(chunk.transfer_id)
        if t is None or t.role != "recv":
            return None, f"refused by {self.worker_id}: transfer {chunk.transfer_id!r} is not expected"
        if t.peer.get("worker_id") != sender:
            expected = t.peer.get("worker_id")
            return None, f"refused by {self.worker_id}: {chunk.transfer_id!r} is expected from {expected!r}"
        with self._lock:
            if self._expire(t) or t.status.done or t.scratch.get("streaming"):
                return None, f"refused by {self.worker_id}: {chunk.transfer_id!r} is {t.status.name} ({t.error})"
            t.scratch["streaming"] = True  # a second stream for the same id is refused
        if chunk.total_bytes != t.nbytes:
            why = f"size mismatch: sender has {chunk.total_bytes} bytes, receiver expects {t.nbytes}"
            self._fail(t, why)
            return None, why
        self._advance(t, TransferStatus.TRANSFERRING)
        why = self._write(t, chunk)
        return (t, None) if why is None else (None, why)

    def _write(self, t: Transfer, chunk: kvtransfer_pb2.KvChunk) -> str | None:
        if self._expire(t) or t.status.done:
            return f"refused by {self.worker_id}: {t.transfer_id!r} is {t.status.name} ({t.error})"
        n = len(chunk.data)
        if chunk.transfer_id != t.transfer_id or chunk.total_bytes != t.nbytes or chunk.offset != t.received \
                or t.received + n > t.nbytes:
            why = f"bad chunk: id={chunk.transfer_id!r} offset={chunk.offset} len={n} " \
                  f"total={chunk.total_bytes}; expected offset {t.received} of {t.nbytes}"
            self._fail(t, why)
            return why
        np.copyto(t.scratch["dst"][t.received:t.received + n], np.frombuffer(chunk.data, dtype=np.uint8))
        t.received += n
        self._count("recv", n)
        return None

    def _finish(self, t: Transfer) -> str | None:
        if t.received != t.nbytes:
            why = f"incomplete stream: {t.received} of {t.nbytes} bytes"
            self._fail(t, why)
            return why
        if not self._succeed(t):
            return f"refused by {self.worker_id}: {t.transfer_id!r} is {t.status.name} ({t.error})"
        return None

    # ------------------------------------------------------------ sender side
    def send(self, transfer_id: str, tensor: torch.Tensor, peer: Endpoint, timeout_s: float) -> None:
        t = self._new_transfer(transfer_id, "send", peer, timeout_s, tensor.contiguous())
        self._spawn(self._run_send, t, name=f"send-{transfer_id}")

    def _stub(self, peer: Endpoint) -> kvtransfer_pb2_grpc.KvTransferStub:
        target = _target(str(peer["host"]), int(peer["port"]))
        with self._channels_lock:
            if target not in self._channels:
                channel = grpc.insecure_channel(target, options=[
                    ("grpc.max_send_message_length", self.chunk_bytes + _MESSAGE_OVERHEAD),
                    ("grpc.max_receive_message_length", 1 << 20)])
                self._channels[target] = (channel, kvtransfer_pb2_grpc.KvTransferStub(channel))
            return self._channels[target][1]

    def _chunks(self, t: Transfer, chunk_bytes: int) -> Iterator[kvtransfer_pb2.KvChunk]:
        data = byte_view(t.tensor.cpu())
        self._advance(t, TransferStatus.TRANSFERRING)  # gRPC pulls the first chunk once connected
        for off, n in chunk_ranges(t.nbytes, chunk_bytes):
            if t.status.done:  # aborted or timed out: stop feeding the stream
                return
            yield kvtransfer_pb2.KvChunk(transfer_id=t.transfer_id, offset=off, total_bytes=t.nbytes,
                                         data=data[off:off + n].numpy().tobytes())
            self._count("send", n)

    def _run_send(self, t: Transfer) -> None:
        if not self._start_send_faults(t):
            return
        try:
            stub = self._stub(t.peer)
        except (KeyError, ValueError) as e:
            self._fail(t, f"bad grpc endpoint {t.peer}: {e}")
            return
        if t.scratch["drop"]:
            self._advance(t, TransferStatus.TRANSFERRING)
            return  # nothing is pushed and no ack comes: the deadline fails both sides
        chunk = min(self.chunk_bytes, int(t.peer.get("max_chunk_bytes", self.chunk_bytes)))
        metadata = [(_SENDER_KEY, self.worker_id)]
        proof = self._proof(t.transfer_id, t.nbytes)
        if proof is not None:
            metadata.append((_PROOF_KEY, proof))
        call = stub.Push.future(self._chunks(t, chunk), timeout=max(t.remaining(), 0.001),
                                metadata=tuple(metadata), wait_for_ready=True)
        with self._lock:
            t.scratch["call"] = call
        if t.status.done:  # aborted between send() and here
            call.cancel()
        try:
            ack = call.result()  # bounded by the RPC deadline above
        except grpc.FutureCancelledError:
            self._fail(t, "cancelled")
            return
        except grpc.RpcError as e:
            self._fail(t, f"push to {t.peer.get('worker_id')} failed: {e.code().name}: {e.details()}")
            return
        if ack.ok:
            self._succeed(t)
        else:
            self._fail(t, f"peer refused: {ack.error}")

    def _on_abort(self, t: Transfer) -> None:
        call = t.scratch.get("call")
        if call is not None:
            call.cancel()

    def _close_backend(self) -> None:
        self._server.stop(grace=0.5).wait(timeout=5.0)
        self._executor.shutdown(wait=False)  # grpc leaves its idle handler threads to us
        with self._channels_lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
