"""Shared-memory buffers of the shm backend: the receiver's pool and the sender's mappings.

A buffer is an anonymous ``memfd`` (Linux ``memfd_create``): it has no name
in ``/dev/shm`` or anywhere else, so nothing can guess it, open it or leak it
there; the kernel frees its memory once the last file descriptor and the last
mapping of it are gone, including when a process dies. The only way to reach
one is to be handed its descriptor over a Unix socket (``SCM_RIGHTS``).

Receiver (:class:`BufferPool`): ``expect`` takes a buffer for the transfer's
destination. Buffers are created pre-faulted (``MAP_POPULATE``) and, once the
received tensor is garbage (a finalizer sees it), go back to the pool for the
next transfer, so a steady stream of transfers writes into memory whose
pages are already there on both sides. A buffer that was handed to a sender
and whose transfer then failed is *retired*, never reused (the sender may
still be writing into it): it is closed once its tensor is garbage. The pool
keeps at most ``pool_bytes`` of buffers; beyond that a transfer gets a
one-off buffer, closed after use.

Sender (:class:`PeerMappings`): the receiver's buffers it was handed, mapped
once (``MAP_POPULATE``) and kept, keyed by the receiver's instance and the
buffer's token; a mapping is dropped when the receiver no longer lists its
token as live, when the receiver's process is gone, or by LRU beyond a cap.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

MEMFD_NAME = "splitserve-kv"  # shows as "/memfd:splitserve-kv (deleted)" in /proc/<pid>/maps and fd links
_MIN_BUFFER = 64 << 10
_PROT = mmap.PROT_READ | mmap.PROT_WRITE


def host_key() -> str:
    """What two processes must share to exchange memfds: the boot (one kernel) and the network namespace
    (the abstract Unix socket the descriptor travels over is per namespace)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}/{os.readlink('/proc/self/ns/net')}"


def buffer_size(nbytes: int) -> int:
    """The size of a new buffer for ``nbytes``: rounded up to an eighth of a power of two (<= 12.5 % waste),
    so that payloads of nearby sizes (prompts of nearby lengths) reuse one buffer."""
    size = max(int(nbytes), _MIN_BUFFER)
    step = max(1 << max(size.bit_length() - 4, 0), mmap.PAGESIZE)
    return -(-size // step) * step


class _Fd:
    """A file descriptor closed exactly once, from any thread, without a lock (finalizers may run anywhere)."""

    def __init__(self, fd: int) -> None:
        self._slot = [fd]

    @property
    def fd(self) -> int:
        return self._slot[0] if self._slot else -1

    def close(self) -> None:
        try:
            fd = self._slot.pop()  # atomic under the GIL: a second caller finds the list empty
        except IndexError:
            return
        os.close(fd)


def _map(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=_PROT)


@dataclass(eq=False)
class ShmBuffer:
    """One memfd and this process's mapping of it."""

    token: str  # names the buffer to its sender's mapping cache (not a secret: only the fd grants access)
    size: int
    fd: _Fd
    mm: mmap.mmap | None
    pooled: bool
    retired: bool = False  # handed out and then failed: never reused
    lent: bool = False  # a destination tensor of it is alive


class BufferPool:
    """The receiver's buffers (see the module doc); thread-safe."""

    def __init__(self, pool_bytes: int) -> None:
        if pool_bytes < 0:
            raise ValueError("pool_bytes must be >= 0")
        self.pool_bytes = pool_bytes
        self._lock = threading.Lock()
        self._buffers: dict[str, ShmBuffer] = {}  # pooled ones (lent or free)
        self._free: list[ShmBuffer] = []
        self._returned: deque[ShmBuffer] = deque()  # filled by finalizers, without a lock
        self.closed = False
        self.created = 0  # buffers made since construction (tests see reuse)

    # -------------------------------------------------------------- lending
    def lend(self, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[ShmBuffer, torch.Tensor]:
        """A buffer of at least ``nbytes`` and a tensor of ``shape``/``dtype`` on its first bytes.

        The buffer is the pool's again once that tensor (and every view of it) is garbage.
        """
        buf = self._take(nbytes)
        arr = np.frombuffer(buf.mm, dtype=np.uint8, count=nbytes)  # type: ignore[arg-type]
        weakref.finalize(arr, self._on_tensor_dead, buf)
        tensor = torch.from_numpy(arr).view(dtype).reshape(shape)  # holds arr until the last view dies
        return buf, tensor

    def _take(self, nbytes: int) -> ShmBuffer:
        with self._lock:
            if self.closed:
                raise RuntimeError("the buffer pool is closed")
            self._drain()
            fits = [b for b in self._free if b.size >= nbytes]
            if fits:
                buf = min(fits, key=lambda b: b.size)
                self._free.remove(buf)
                buf.lent = True
                return buf
            size = buffer_size(nbytes)
            pooled = size <= self.pool_bytes
            while pooled and self._pooled_bytes() + size > self.pool_bytes and self._free:
                victim = max(self._free, key=lambda b: b.size)  # make room: drop the largest free one
                self._free.remove(victim)
                self._close(victim)
            pooled = pooled and self._pooled_bytes() + size <= self.pool_bytes
        # Created outside the lock: populating a large buffer takes a while.
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            # A one-off buffer is not pre-faulted: populating it would cost as much as the sender's faults.
            mm = _map(fd, size) if pooled else mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=_PROT)
        except BaseException:
            os.close(fd)
            raise
        buf = ShmBuffer(secrets.token_hex(16), size, _Fd(fd), mm, pooled, lent=True)
        with self._lock:
            self.created += 1
            if pooled and not self.closed:
                self._buffers[buf.token] = buf
            else:
                buf.pooled = False
        return buf

    def retire(self, buf: ShmBuffer) -> None:
        """Never reuse ``buf`` (a sender was given it and its transfer failed); closed once its tensor is garbage."""
        with self._lock:
            buf.retired = True
            self._buffers.pop(buf.token, None)
            if not buf.lent:
                self._close(buf)

    def _on_tensor_dead(self, buf: ShmBuffer) -> None:
        """Finalizer of a lent tensor: any thread, maybe inside our own lock (GC), so no lock here."""
        buf.lent = False
        if buf.retired or not buf.pooled or self.closed:
            buf.fd.close()
            buf.mm = None  # the last reference: unmapped
        else:
            self._returned.append(buf)
            if self.closed:  # closed meanwhile: nobody drains any more
                self._close_returned()

    def _drain(self) -> None:
        """Under the lock: put buffers whose tensors died back on the free list."""
        while True:
            try:
                buf = self._returned.popleft()
            except IndexError:
                return
            if buf.retired or self.closed or buf.token not in self._buffers:
                self._close(buf)
            elif buf not in self._free:
                self._free.append(buf)

    def _close_returned(self) -> None:
        while True:
            try:
                buf = self._returned.popleft()
            except IndexError:
                return
            buf.fd.close()
            buf.mm = None

    def _close(self, buf: ShmBuffer) -> None:
        self._buffers.pop(buf.token, None)
        buf.fd.close()
        buf.mm = None

    def _pooled_bytes(self) -> int:
        return sum(b.size for b in self._buffers.values())

    # ------------------------------------------------------------ inspection
    def live_tokens(self) -> list[str]:
        """Tokens of the pooled buffers (a sender drops its mappings of any other of ours)."""
        with self._lock:
            self._drain()
            return list(self._buffers)

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._drain()
            return {"pooled": len(self._buffers), "free": len(self._free),
                    "lent": sum(b.lent for b in self._buffers.values()), "pooled_bytes": self._pooled_bytes(),
                    "created": self.created}

    def close(self) -> None:
        """Close every free buffer now; lent ones are closed when their tensors die."""
        with self._lock:
            self.closed = True
            for buf in list(self._buffers.values()):
                if not buf.lent:
                    self._close(buf)
            self._buffers.clear()
            self._free.clear()
            self._drain()


@dataclass(eq=False)
class _Mapping:
    mm: mmap.mmap
    size: int


@dataclass(eq=False)
class _Peer:
    pid: int
    maps: OrderedDict[str, _Mapping] = field(default_factory=OrderedDict)  # token -> mapping, LRU first


class PeerMappings:
    """The sender's mappings of receivers' buffers (see the module doc); thread-safe.

    ``max_bytes`` bounds what stays mapped across all receivers (LRU).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}  # receiver instance -> its buffers we map
        self.mapped = 0  # mmaps made since construction (tests see reuse)

    def map(self, instance: str, pid: int, token: str, size: int, fd: int | None, live: list[str]) -> mmap.mmap:
        """The mapping of buffer ``token`` of receiver ``instance``; maps ``fd`` (then closes it) if new.

        ``live``: the receiver's pooled tokens now; mappings of its other buffers are dropped.
        """
        try:
            with self._lock:
                peer = self._peers.setdefault(instance, _Peer(pid))
                for old in [tok for tok in peer.maps if tok not in live and tok != token]:
                    self._unmap(peer.maps.pop(old))
                m = peer.maps.get(token)
                if m is not None and m.size == size:
                    peer.maps.move_to_end(token)
                    return m.mm
            if fd is None:
                raise ValueError("the receiver sent no buffer")
            st = os.fstat(fd)
            if st.st_size != size:
                raise ValueError(f"the receiver's buffer has {st.st_size} bytes, not the {size} it said")
            mm = _map(fd, size)
        finally:
            if fd is not None:
                os.close(fd)  # the mapping keeps the memory; the descriptor is not needed any more
        with self._lock:
            self.mapped += 1
            peer = self._peers.setdefault(instance, _Peer(pid))
            if token in peer.maps:
                self._unmap(peer.maps.pop(token))
            if token in live:  # a one-off buffer is not kept
                peer.maps[token] = _Mapping(mm, size)
            self._evict()
        return mm

    def forget_peer(self, instance: str) -> None:
        with self._lock:
            peer = self._peers.pop(instance, None)
            for m in peer.maps.values() if peer is not None else ():
                self._unmap(m)

    def drop_dead(self) -> None:
        """Unmap the buffers of receivers whose process is gone (their memory is freed with our mapping)."""
        with self._lock:
            dead = [inst for inst, p in self._peers.items() if not _alive(p.pid)]
        for inst in dead:
            self.forget_peer(inst)

    def _evict(self) -> None:
        total = sum(m.size for p in self._peers.values() for m in p.maps.values())
        while total > self.max_bytes:
            victim = next(((p, tok) for p in self._peers.values() for tok in p.maps), None)
            if victim is None:
                return
            m = victim[0].maps.pop(victim[1])
            total -= m.size
            self._unmap(m)

    @staticmethod
    def _unmap(m: _Mapping) -> None:
        try:
            m.mm.close()
        except BufferError:  # a transfer still writes through it: unmapped when its view dies
            pass

    def count(self) -> int:
        with self._lock:
            return sum(len(p.maps) for p in self._peers.values())

    def close(self) -> None:
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for p in peers:
            for m in p.maps.values():
                self._unmap(m)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
