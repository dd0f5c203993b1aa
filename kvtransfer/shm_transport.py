"""Shared-memory backend: KV between two processes of one node, copied once.

Every transport listens on an abstract Unix socket with an unguessable name
(Linux; no file to clean up, gone with the process). The KV itself never
crosses the socket: the receiver's destination *is* shared memory (a pooled
memfd, see :mod:`kvtransfer.shm_buffers`) and the sender copies straight
into it. Lifecycle of one transfer (every wait bounded by the deadline):

1. The receiver ``expect``\\ s: it takes a pre-faulted buffer from its pool
   and makes the destination tensor a view of it (WAITING).
2. The sender ``send``\\ s: a thread connects to the receiver's socket
   (BOOTSTRAPPING) and asks for the transfer: ``push {transfer_id, sender,
   nbytes, proof}``.
3. The receiver checks, in this order and before it hands out anything: the
   peer's Unix credentials (same user), the proof of the cluster secret (see
   :mod:`kvtransfer.push_proof`), that the transfer is expected from that
   sender with that size and is still waiting, and that no sender was
   granted it before. A refusal fails the sender at once (and, for a bad
   proof, a wrong size or an abort, the receiver's transfer too). Otherwise
   it *grants* it: it sends the buffer's descriptor (``SCM_RIGHTS``), its
   token and size, and the tokens of its pooled buffers (TRANSFERRING).
4. The sender maps the buffer (or reuses its mapping from an earlier
   transfer into the same buffer), copies the payload in chunks of
   ``chunk_bytes`` (an abort stops between chunks), and says ``done``.
5. The receiver is SUCCESS on ``done`` and acknowledges; the sender is
   SUCCESS on the acknowledgement. ``result`` hands out the shared-memory
   tensor itself (no copy); its buffer returns to the pool when it is garbage.

Failure and cleanup: a transfer that fails after its grant (abort on either
side, deadline, a side that dies: the socket breaks) *retires* its buffer,
which is never reused (the sender may still be writing) and is freed when
its tensor is garbage. A receiver's abort shuts the connection, so the
sender fails at once. Memfds have no name: nothing is ever left in
``/dev/shm``, and the kernel frees a buffer once no process maps it.

What the secret covers: the push proof authenticates the sender before any
buffer is granted. The receiver is authenticated to the sender by its
socket's name (random, published only through the router) and by the peer
credentials (same user). Processes of the same user can read each other's
memory anyway; this backend does not try to guard against them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import select
import socket
import struct
import time
from typing import Any, TypeGuard

import torch

from kvtransfer.base import TransferStatus
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES, byte_view
from kvtransfer.endpoints import Endpoint, ShmEndpoint
from kvtransfer.faults import TransferFaults
from kvtransfer.shm_buffers import BufferPool, PeerMappings, ShmBuffer, host_key
from kvtransfer.shm_settings import DEFAULT_SHM_POOL_BYTES
from kvtransfer.transport_base import Transfer, TransportBase

log = logging.getLogger(__name__)

_FRAME = struct.Struct(">I")
_MAX_FRAME = 64 << 10  # control messages are small JSON objects
_HANDSHAKE_S = 5.0  # a connection must name its transfer within this
_MAX_CONNECTIONS = 256  # open control connections at once; more are closed unanswered
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)
_CRED = struct.Struct("3i")  # pid, uid, gid
_PEER_CHECK_S = 0.005  # during a long copy, how often the sender looks whether the receiver hung up


class ProtocolError(RuntimeError):
    """A control message that is malformed, too large, or missing."""


def send_frame(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    frame = _FRAME.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [frame], fds)
        frame = frame[sent:]
    if frame:
        sock.sendall(frame)


def recv_frame(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One control message and the descriptors that came with it; :class:`ProtocolError` on EOF or garbage."""
    buf, fds = b"", []
    try:
        while len(buf) < _FRAME.size or len(buf) < _FRAME.size + _FRAME.unpack_from(buf)[0]:
            if len(buf) >= _FRAME.size and _FRAME.unpack_from(buf)[0] > _MAX_FRAME:
                raise ProtocolError("control message too large")
            want = _MAX_FRAME + _FRAME.size - len(buf)
            if max_fds and not fds:
                data, got, _, _ = socket.recv_fds(sock, want, max_fds)
                fds.extend(got)
            else:
                data = sock.recv(want)
            if not data:
                raise ProtocolError("connection closed")
            buf += data
        (n,) = _FRAME.unpack_from(buf)
        if len(buf) != _FRAME.size + n:  # the peer speaks only when spoken to: never two messages at once
            raise ProtocolError("unexpected data after a control message")
        msg = json.loads(buf[_FRAME.size:])
        if not isinstance(msg, dict):
            raise ProtocolError("control message is not a JSON object")
        return msg, fds
    except BaseException as e:
        for fd in fds:
            os.close(fd)
        if isinstance(e, ValueError):  # bad JSON or UTF-8
            raise ProtocolError("malformed control message") from e
        raise


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed the connection (or it broke); never blocks, consumes nothing.

    (A zero-timeout poll first: a socket with a timeout waits on EAGAIN even with MSG_DONTWAIT.)
    """
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    events = p.poll(0)
    if not events:
        return False
    if events[0][1] & (select.POLLHUP | select.POLLERR):
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""  # readable: returns at once
    except OSError:
        return True


def _peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _CRED.size))
    return uid


class ShmTransport(TransportBase):
    """KV transfer through shared memory between processes of one node (see the module doc).

    ``node_id``: the node this process runs on as the cluster names it (the
    Ray node id); with the host key (boot and network namespace) it says which
    peers share memory with us. ``pool_bytes``: the receiver's pool of
    pre-faulted buffers (see :mod:`kvtransfer.shm_buffers`). ``chunk_bytes``:
    the sender copies in pieces of this size (an abort stops between them).
    ``secret``: the cluster secret this side proves and demands.
    ``host``/``port`` are accepted and ignored (the socket is local).
    """

    def __init__(self, worker_id: str, *, node_id: str | None = None, pool_bytes: int = DEFAULT_SHM_POOL_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, faults: TransferFaults | None = None,
                 secret: str | None = None, host: str | None = None, port: int | None = None) -> None:
        super().__init__(worker_id, faults, secret)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be > 0")
        self.chunk_bytes = chunk_bytes
        self.host_key = host_key()
        self.node_id = node_id
        self.instance = secrets.token_hex(16)
        self._address = f"\0splitserve-kv/{secrets.token_hex(16)}"  # abstract: no file, gone with the process
        self._pool = BufferPool(pool_bytes)
        self._mappings = PeerMappings(max(2 * pool_bytes, 1 << 30))
        self._conns: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(self._address)
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._uid = os.getuid()
        self._spawn(self._accept_loop, name="shm-accept")

    def endpoint(self) -> ShmEndpoint:
        return ShmEndpoint(worker_id=self.worker_id, node=self.node_id, host_key=self.host_key,
                           socket=self._address[1:], instance=self.instance, pid=os.getpid())

    def shares_memory_with(self, peer: Endpoint) -> TypeGuard[ShmEndpoint]:
        """Whether ``peer`` is an shm endpoint on this node: same node id and same host key."""
        return isinstance(peer, ShmEndpoint) and peer.node == self.node_id and peer.host_key == self.host_key

    def pool_stats(self) -> dict[str, int]:
        """The receiver's buffer pool (pooled, free, lent, pooled_bytes, created) and the sender's mappings."""
        return {**self._pool.stats(), "peer_mappings": self._mappings.count(), "mapped": self._mappings.mapped}

    # ---------------------------------------------------------- receiver side
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        shape = tuple(int(d) for d in shape)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        buf: ShmBuffer | None = None
        if nbytes:
            buf, dst = self._pool.lend(nbytes, shape, dtype)
        else:
            dst = torch.empty(shape, dtype=dtype)
        try:
            with self._lock:  # a sender that connects at once must find the buffer with the transfer
                t = self._new_transfer(transfer_id, "recv", peer, timeout_s, dst, TransferStatus.WAITING)
                t.scratch["buf"] = buf
        except BaseException:
            del dst  # its buffer goes back to the pool
            raise

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # shut down by close()
                return
            with self._lock:
                full = len(self._conns) >= _MAX_CONNECTIONS or self._closed
                if not full:
                    self._conns.add(conn)
            if full:
                conn.close()
                continue
            self._spawn(self._serve, conn, name="shm-conn")

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(_HANDSHAKE_S)
            if _peer_uid(conn) != self._uid:
                send_frame(conn, {"ok": False, "error": f"refused by {self.worker_id}: another user"})
                return
            msg, _ = recv_frame(conn)
            self._grant_and_wait(conn, msg)
        except (OSError, ProtocolError) as e:
            log.debug("%s: control connection ended: %s", self.worker_id, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _grant_and_wait(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        tid, sender, nbytes = msg.get("transfer_id"), msg.get("sender"), msg.get("nbytes")
        if msg.get("op") != "push" or not isinstance(tid, str) or not isinstance(sender, str) \
                or type(nbytes) is not int or nbytes < 0:
            send_frame(conn, {"ok": False, "error": f"refused by {self.worker_id}: malformed push"})
            return
        why = self._authenticate(tid, sender, nbytes, msg.get("proof"))  # before anything else
        t = None if why is not None else self._find(tid)
        if why is None:
            why = self._check_push(t, tid, sender, nbytes)
        if why is not None:
            send_frame(conn, {"ok": False, "error": why})
            return
        assert t is not None
        buf: ShmBuffer | None = None
        with self._lock:  # exactly one sender is granted a transfer, and never after it ended
            if self._expire(t) or t.status.done or t.scratch.get("granted"):
                why = f"refused by {self.worker_id}: {tid!r} is {t.status.name} ({t.error})"
            else:
                buf = t.scratch.get("buf")
                t.scratch.update(granted=True, conn=conn)
                t.status = TransferStatus.TRANSFERRING
        if why is not None:
            send_frame(conn, {"ok": False, "error": why})
            return
        try:
            grant = {"ok": True, "token": buf.token if buf else "", "size": buf.size if buf else 0,
                     "live": self._pool.live_tokens()}
            send_frame(conn, grant, [buf.fd.fd] if buf is not None else None)
            conn.settimeout(max(t.remaining(), 0.001))
            try:
                done, _ = recv_frame(conn)
            except (OSError, ProtocolError) as e:
                reason = "timed out" if isinstance(e, socket.timeout) else f"sender went away ({e})"
                self._fail(t, f"{reason} in {t.status.name}")
                return
            if done.get("op") != "done" or done.get("ok") is not True:
                self._fail(t, f"sender gave up: {str(done.get('error'))[:500]}")
            chunks = done.get("chunks")
            ok = not self._expire(t) and self._succeed(t)
            if ok:  # the sender's count of its copies (bounded: it is only a statistic)
                self._count("recv", t.nbytes, chunks if type(chunks) is int and 0 < chunks <= t.nbytes + 1 else 1)
            send_frame(conn, {"ok": ok, "error": None if ok else f"refused by {self.worker_id}: {t.error}"})
        finally:
            if t.status != TransferStatus.SUCCESS and buf is not None:
                self._pool.retire(buf)  # (already done by _fail; here too should any path have missed it)

    def _check_push(self, t: Transfer | None, tid: str, sender: str, nbytes: int) -> str | None:
        if t is None or t.role != "recv":
            return f"refused by {self.worker_id}: transfer {tid!r} is not expected"
        if t.peer.worker_id != sender:
            return f"refused by {self.worker_id}: {tid!r} is expected from {t.peer.worker_id!r}"
        if nbytes != t.nbytes:
            why = f"size mismatch: sender has {nbytes} bytes, receiver expects {t.nbytes}"
            self._fail(t, why)
            return why
        return None

    # ------------------------------------------------------------ sender side
    def send(self, transfer_id: str, tensor: torch.Tensor, peer: Endpoint, timeout_s: float) -> None:
        t = self._new_transfer(transfer_id, "send", peer, timeout_s, tensor.contiguous())
        self._spawn(self._run_send, t, name=f"send-{transfer_id}")

    def _run_send(self, t: Transfer) -> None:
        if not self._start_send_faults(t):
            return
        peer = t.peer
        if not self.shares_memory_with(peer):
            self._fail(t, f"{peer.worker_id!r} is not an shm endpoint on this node")
            return
        if t.scratch["drop"]:
            self._advance(t, TransferStatus.TRANSFERRING)
            return  # nothing is pushed and no ack comes: the deadline fails both sides
        self._mappings.drop_dead()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with self._lock:
            t.scratch["conn"] = sock
            aborted = t.status.done
        try:
            if aborted:
                return
            sock.settimeout(max(t.remaining(), 0.001))
            try:
                sock.connect("\0" + peer.socket)
            except OSError as e:
                if e.errno in (errno.ECONNREFUSED, errno.ENOENT):  # that receiver is gone: so are its buffers
                    self._mappings.forget_peer(peer.instance)
                raise
            if _peer_uid(sock) != self._uid:
                self._fail(t, "the receiver runs as another user")
                return
            self._push(t, sock, peer)
        except (OSError, ProtocolError) as e:
            self._fail(t, f"push to {peer.worker_id} failed: {type(e).__name__}: {e}")
        finally:
            sock.close()

    def _push(self, t: Transfer, sock: socket.socket, peer: ShmEndpoint) -> None:
        send_frame(sock, {"op": "push", "transfer_id": t.transfer_id, "sender": self.worker_id, "nbytes": t.nbytes,
                          "proof": self._proof(t.transfer_id, t.nbytes)})
        grant, fds = recv_frame(sock, max_fds=1)
        if grant.get("ok") is not True:
            for fd in fds:
                os.close(fd)
            self._fail(t, f"peer refused: {str(grant.get('error'))[:500]}")
            return
        for fd in fds[1:]:
            os.close(fd)
        self._advance(t, TransferStatus.TRANSFERRING)
        n, chunks = t.nbytes, 0
        if n:
            token, size, live = grant.get("token"), grant.get("size"), grant.get("live")
            if not isinstance(token, str) or type(size) is not int or size < n or not isinstance(live, list):
                for fd in fds:
                    os.close(fd)
                raise ProtocolError(f"bad grant: {str(grant)[:200]}")
            mm = self._mappings.map(peer.instance, peer.pid, token, size,
                                    fds[0] if fds else None, [str(x) for x in live])
            dst = torch.frombuffer(mm, dtype=torch.uint8, count=n)
            src = byte_view(t.tensor if t.tensor.device.type == "cpu" else t.tensor.cpu())
            next_check = time.monotonic() + _PEER_CHECK_S
            for off in range(0, n, self.chunk_bytes):  # (a range, not chunk_ranges: tiny chunks make long lists)
                k = min(self.chunk_bytes, n - off)
                if t.status.done:  # aborted or timed out: stop writing
                    break
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + _PEER_CHECK_S
                    if _hung_up(sock):  # the receiver aborted or died: stop now, not after the copy
                        self._fail(t, f"{peer.worker_id} ended the transfer during the copy")
                        break
                dst[off:off + k].copy_(src[off:off + k])
                chunks += 1
            del dst
        else:
            for fd in fds:
                os.close(fd)
        self._expire(t)
        if t.status.done:
            send_frame(sock, {"op": "done", "ok": False, "error": f"sender {self.worker_id}: {t.error}"})
            return
        self._count("send", n, max(chunks, 1))
        send_frame(sock, {"op": "done", "ok": True, "chunks": max(chunks, 1)})
        sock.settimeout(max(t.remaining(), 0.001))
        ack, _ = recv_frame(sock)
        if ack.get("ok") is True:
            self._succeed(t)
        else:
            self._fail(t, f"peer refused: {str(ack.get('error'))[:500]}")

    # ---------------------------------------------------------------- both
    def _fail(self, t: Transfer, reason: str) -> bool:
        """Also frees a failed receive's buffer at once (a FAILED transfer never hands out its tensor)."""
        if not super()._fail(t, reason):
            return False
        if t.role == "recv":
            with self._lock:
                buf, granted = t.scratch.pop("buf", None), t.scratch.get("granted")
                t.tensor = torch.empty(0, dtype=t.tensor.dtype)  # the last reference: the buffer goes
            if buf is not None and granted:
                self._pool.retire(buf)  # the sender may still write into it: never reuse it
        return True

    def _on_abort(self, t: Transfer) -> None:
        conn = t.scratch.get("conn")
        if conn is not None:  # wakes the thread waiting on it; the peer sees the connection end
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _on_forget(self, t: Transfer) -> None:
        t.scratch.pop("buf", None)

    def close(self) -> None:
        with self._lock:
            first = not self._closed
        if first:  # before the base class joins our threads: wake the accept loop and idle handshakes
            with self._lock:
                socks = [self._listener, *self._conns]
            for sock in socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        super().close()

    def _close_backend(self) -> None:
        self._listener.close()
        self._pool.close()
        self._mappings.close()
