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

Stream admission (the server never holds a thread per stream: it is a
``grpc.aio`` server on one event-loop thread, so streams that send nothing
cost no worker):

- The stream's metadata names its sender (``kv-sender``), transfer
  (``kv-transfer-id-bin``) and size (``kv-total-bytes``). With a cluster
  secret (see :mod:`kvtransfer.push_proof`) the sender's proof travels in
  ``kv-proof`` and is checked against those before any chunk is read: a
  stream without the right proof ends at once with ``UNAUTHENTICATED``.
  Then the transfer must be expected, from that sender, of that size, and
  not already streaming, or the stream is refused (``PushAck(ok=false)``),
  again before a chunk is read. Every chunk must carry the same id and size.
- At most ``max_streams_per_peer`` streams per sender at once (more get
  ``RESOURCE_EXHAUSTED``), and ``max_streams`` in all.
- A stream that sends nothing for ``stream_idle_s`` (default 10 s; also
  never past its transfer's deadline) is closed with ``DEADLINE_EXCEEDED``
  and its transfer FAILED.

The channel itself is plaintext: the secret authenticates pushes, it does
not hide or sign the KV bytes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio
import numpy as np
import torch

from kvtransfer.base import TransferStatus
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES, byte_view, chunk_ranges
from kvtransfer.endpoints import Endpoint, GrpcEndpoint, narrow
from kvtransfer.faults import TransferFaults
from kvtransfer.stream_limits import DEFAULT_MAX_STREAMS_PER_PEER, DEFAULT_STREAM_IDLE_S, MAX_STREAMS_PER_PEER
from kvtransfer.transport_base import Transfer, TransportBase
from protos import kvtransfer_pb2, kvtransfer_pb2_grpc

# Room for the KvChunk fields around `data` in one gRPC message.
_MESSAGE_OVERHEAD = 64 << 10
_SENDER_KEY = "kv-sender"  # metadata: who pushes, checked against expect(peer=...)
_PROOF_KEY = "kv-proof"  # metadata: the sender's proof that it holds the cluster secret
_TRANSFER_KEY = "kv-transfer-id-bin"  # metadata: the transfer this stream carries (UTF-8; ids may be any text)
_TOTAL_KEY = "kv-total-bytes"  # metadata: its size in bytes
_START_TIMEOUT_S = 30.0


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Servicer(kvtransfer_pb2_grpc.KvTransferServicer):
    def __init__(self, transport: GrpcTransport) -> None:
        self._transport = transport

    async def Push(self, request_iterator: AsyncIterator[kvtransfer_pb2.KvChunk],
                   context: grpc.aio.ServicerContext) -> kvtransfer_pb2.PushAck:
        tr = self._transport
        metadata = {m.key: m.value for m in context.invocation_metadata() or ()}
        sender, proof = str(metadata.get(_SENDER_KEY, "")), metadata.get(_PROOF_KEY)
        raw_id, raw_total = metadata.get(_TRANSFER_KEY), metadata.get(_TOTAL_KEY)
        try:
            transfer_id = raw_id.decode() if isinstance(raw_id, bytes) else None
            total = int(raw_total) if isinstance(raw_total, str) and raw_total.isdigit() else None
        except UnicodeDecodeError:
            transfer_id = None
        if transfer_id is None or total is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a push names its transfer and size in metadata ({_TRANSFER_KEY}, {_TOTAL_KEY})")
        # Before any chunk is read: who is it, and may it hold a stream?
        why = tr._authenticate(transfer_id, sender, total, proof)
        if why is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        if not tr._take_stream_slot(sender):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"refused by {tr.worker_id}: {sender[:128]!r} already has "
                                f"{tr.max_streams_per_peer} streams open")
        try:
            t, why = tr._begin(transfer_id, sender, total)
            if t is None:
                return kvtransfer_pb2.PushAck(ok=False, error=why)
            try:
                while True:
                    wait_s = min(tr.stream_idle_s, max(t.remaining(), 0.0))
                    try:  # asyncio.timeout, not wait_for: see worker_common/timeouts.py
                        async with asyncio.timeout(wait_s):
                            chunk = await context.read()
                    except TimeoutError:
                        why = (f"stream of {transfer_id!r} from {sender[:128]!r} sent nothing for {wait_s:g}s"
                               if t.remaining() > 0 else f"timed out after {t.timeout_s:g}s in {t.status.name}")
                        tr._fail(t, why)
                        break
                    if chunk is grpc.aio.EOF:
                        break
                    why = tr._write(t, chunk)
                    if why is not None:
                        return kvtransfer_pb2.PushAck(ok=False, error=why)
            except asyncio.CancelledError:  # the sender cancelled or the connection went away
                tr._fail(t, f"stream from {sender[:128]!r} was cancelled")
                raise
            except grpc.RpcError as e:
                tr._fail(t, f"stream from {sender[:128]!r} broke: {e}")
                return kvtransfer_pb2.PushAck(ok=False, error=f"stream broke: {e}")
        finally:
            tr._release_stream_slot(sender)
        if why is not None:  # idle or past the deadline: the stream is closed, not acknowledged
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, why)
        why = tr._finish(t)
        return kvtransfer_pb2.PushAck(ok=why is None, error=why or "")


class GrpcTransport(TransportBase):
    """KV transfer over a client-streaming gRPC call (see the module doc).

    ``host``/``port`` are where this transport's server listens (port 0 picks
    a free port; :meth:`endpoint` publishes the one bound). ``chunk_bytes``
    is both the largest chunk this side sends and the largest it accepts.
    ``secret``: the cluster secret this side proves and demands (module doc).
    ``stream_idle_s``: a stream that sends nothing for this long is closed.
    ``max_streams_per_peer`` / ``max_streams``: open streams per sender / in all.
    """

    def __init__(self, worker_id: str, host: str = "127.0.0.1", port: int = 0, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, stream_idle_s: float = DEFAULT_STREAM_IDLE_S,
                 max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
                 max_streams: int = MAX_STREAMS_PER_PEER,
                 faults: TransferFaults | None = None, secret: str | None = None) -> None:
        super().__init__(worker_id, faults, secret)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be > 0")
        if not 0 < stream_idle_s < float("inf"):
            raise ValueError(f"stream_idle_s must be a positive number of seconds, got {stream_idle_s}")
        if max_streams_per_peer < 1 or max_streams < max_streams_per_peer:
            raise ValueError("need 1 <= max_streams_per_peer <= max_streams")
        self.chunk_bytes = chunk_bytes
        self.host = host
        self.stream_idle_s, self.max_streams_per_peer = float(stream_idle_s), max_streams_per_peer
        self._streams: dict[str, int] = {}  # sender -> open streams (touched on the loop thread only)
        # One event loop thread serves every stream: an idle stream holds no thread.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name=f"kvt-{worker_id}-grpc-server",
                                             daemon=True)
        self._loop_thread.start()
        try:
            self._server, self.port = asyncio.run_coroutine_threadsafe(
                self._start_server(host, port, max_streams), self._loop).result(_START_TIMEOUT_S)
        except BaseException:
            self._stop_loop()
            raise
        self._channels: dict[str, tuple[grpc.Channel, kvtransfer_pb2_grpc.KvTransferStub]] = {}
        self._channels_lock = threading.Lock()

    async def _start_server(self, host: str, port: int, max_streams: int) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", self.chunk_bytes + _MESSAGE_OVERHEAD),
                     ("grpc.max_send_message_length", 1 << 20),
                     # Two servers must never silently share a fixed port.
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=max_streams)
        kvtransfer_pb2_grpc.add_KvTransferServicer_to_server(_Servicer(self), server)
        bound = server.add_insecure_port(_target(host, port))
        if not bound:
            raise RuntimeError(f"gRPC transport {self.worker_id} could not bind {_target(host, port)}")
        await server.start()
        return server, bound

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5.0)
        if not self._loop_thread.is_alive():
            self._loop.close()

    def _take_stream_slot(self, sender: str) -> bool:
        """Loop thread: count one more open stream of ``sender``, unless it has the most it may."""
        if self._streams.get(sender, 0) >= self.max_streams_per_peer:
            return False
        self._streams[sender] = self._streams.get(sender, 0) + 1
        return True

    def _release_stream_slot(self, sender: str) -> None:
        left = self._streams.get(sender, 0) - 1
        if left > 0:
            self._streams[sender] = left
        else:
            self._streams.pop(sender, None)

    def endpoint(self) -> GrpcEndpoint:
        return GrpcEndpoint(worker_id=self.worker_id, host=self.host, port=self.port, max_chunk_bytes=self.chunk_bytes)

    # ---------------------------------------------------------- receiver side
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        t = self._new_transfer(transfer_id, "recv", peer, timeout_s, torch.empty(tuple(shape), dtype=dtype),
                               TransferStatus.WAITING)
        t.scratch["dst"] = byte_view(t.tensor).numpy()  # numpy view: a copy target with no torch warning

    def _begin(self, transfer_id: str, sender: str, total_bytes: int) -> tuple[Transfer | None, str | None]:
        """Start of an (authenticated) stream: is this transfer expected, from this sender, of this size?"""
        t = self._find(transfer_id)
        if t is None or t.role != "recv":
            return None, f"refused by {self.worker_id}: transfer {transfer_id!r} is not expected"
        if t.peer.worker_id != sender:
            return None, f"refused by {self.worker_id}: {transfer_id!r} is expected from {t.peer.worker_id!r}"
        with self._lock:
            if self._expire(t) or t.status.done or t.scratch.get("streaming"):
                return None, f"refused by {self.worker_id}: {transfer_id!r} is {t.status.name} ({t.error})"
            t.scratch["streaming"] = True  # a second stream for the same id is refused
        if total_bytes != t.nbytes:
            why = f"size mismatch: sender has {total_bytes} bytes, receiver expects {t.nbytes}"
            self._fail(t, why)
            return None, why
        self._advance(t, TransferStatus.TRANSFERRING)
        return t, None

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

    def _stub(self, peer: GrpcEndpoint) -> kvtransfer_pb2_grpc.KvTransferStub:
        target = _target(peer.host, peer.port)
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
            peer = narrow(t.peer, GrpcEndpoint)
            stub = self._stub(peer)
        except ValueError as e:
            self._fail(t, f"bad grpc endpoint {t.peer}: {e}")
            return
        if t.scratch["drop"]:
            self._advance(t, TransferStatus.TRANSFERRING)
            return  # nothing is pushed and no ack comes: the deadline fails both sides
        chunk = min(self.chunk_bytes, peer.max_chunk_bytes)
        metadata = [(_SENDER_KEY, self.worker_id), (_TRANSFER_KEY, t.transfer_id.encode()),
                    (_TOTAL_KEY, str(t.nbytes))]
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
            self._fail(t, f"push to {t.peer.worker_id} failed: {e.code().name}: {e.details()}")
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
        try:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace=0.5), self._loop).result(timeout=5.0)
        except Exception:  # noqa: BLE001  # stopping is best effort; the loop goes either way
            pass
        self._stop_loop()
        with self._channels_lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
