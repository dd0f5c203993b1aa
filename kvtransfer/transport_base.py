"""What every backend shares: the per-transfer record, the status rules, threads.

:class:`TransportBase` implements the bookkeeping half of
:class:`~kvtransfer.base.KVTransport` (``poll``, ``error``, ``result``,
``abort``, ``forget``, ``close``) once, so each backend only moves bytes.
The rules it enforces:

1. Status only moves forward (BOOTSTRAPPING -> ... -> SUCCESS/FAILED) and a
   finished status is final: a late success cannot undo a FAILED, and an
   ``abort`` after SUCCESS changes nothing.
2. Deadlines are checked lazily on every read (``poll``/``error``/
   ``result``) and by the backend's threads, so a transfer whose peer never
   shows up is FAILED on time even when no thread of ours is looking.
3. Failing a transfer sets its ``cancelled`` event: threads that sleep or
   poll on behalf of a transfer wait on that event, so abort/close wake them.
4. Senders do not copy: the tensor passed to ``send`` must stay unchanged
   until the transfer is done (the prefill worker keeps its blocks until
   then anyway).
5. ``close`` fails every live transfer, joins our threads (bounded: a
   thread blocked in a C++ call we cannot interrupt is left to end by its
   own deadline; it is a daemon), then releases the backend's resources.

With a cluster secret (``secret=``, every backend) a receiver accepts a push
only with the sender's proof; the proof and its guarantees are in
:mod:`kvtransfer.push_proof`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kvtransfer.base import Endpoint, KVTransport, TransferError, TransferStatus
from kvtransfer.faults import FaultInjector, TransferFaults
from kvtransfer.push_proof import SECRET_REFUSED, proof_matches, transfer_proof

Role = Literal["send", "recv"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Transfer:
    """One side's state of one transfer; ``status``/``error`` change only under the transport lock."""

    transfer_id: str
    role: Role
    peer: Endpoint  # as given to expect/send (immutable: no copy needed)
    timeout_s: float
    deadline: float  # time.monotonic() seconds
    nbytes: int
    tensor: torch.Tensor  # sender: the payload; receiver: the destination
    status: TransferStatus = TransferStatus.BOOTSTRAPPING
    error: str | None = None
    received: int = 0  # receiver: bytes written so far
    cancelled: threading.Event = field(default_factory=threading.Event)
    scratch: dict[str, Any] = field(default_factory=dict)  # backend-private

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def validate_timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    return float(timeout_s)


class TransportBase(KVTransport):
    """Bookkeeping shared by all backends; subclasses move the bytes.

    Subclasses call :meth:`_new_transfer` from ``expect``/``send``, then drive
    the status with :meth:`_advance`, :meth:`_fail` and :meth:`_succeed`, and
    may override :meth:`_on_abort` (tell the peer) and :meth:`_close_backend`.
    ``stats`` counts chunks and bytes so tests can see that chunking happened.
    """

    def __init__(self, worker_id: str, faults: TransferFaults | None = None, secret: str | None = None) -> None:
        if not worker_id:
            raise ValueError("worker_id must be a non-empty string")
        if secret is not None and not secret:
            raise ValueError("secret must be a non-empty string, or None for no secret")
        self.worker_id = worker_id
        self._secret = secret.encode() if secret is not None else None  # never logged or published
        self._faults = FaultInjector(faults)
        self._lock = threading.RLock()
        self._transfers: dict[str, Transfer] = {}
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._stats = {"chunks_sent": 0, "chunks_received": 0, "bytes_sent": 0, "bytes_received": 0,
                       "refused_unauthenticated": 0}

    # --------------------------------------------------------------- registry
    def _new_transfer(self, transfer_id: str, role: Role, peer: Endpoint, timeout_s: float,
                      tensor: torch.Tensor, status: TransferStatus = TransferStatus.BOOTSTRAPPING) -> Transfer:
        timeout_s = validate_timeout(timeout_s)
        t = Transfer(transfer_id, role, peer, timeout_s, time.monotonic() + timeout_s,
                     tensor.numel() * tensor.element_size(), tensor, status)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"transport {self.worker_id} is closed")
            if transfer_id in self._transfers:
                # Reusing a live id would let two transfers share one buffer.
                raise ValueError(f"transfer {transfer_id!r} already exists on {self.worker_id}")
            self._transfers[transfer_id] = t
        return t

    def _find(self, transfer_id: str) -> Transfer | None:
        with self._lock:
            return self._transfers.get(transfer_id)

    def _get(self, transfer_id: str) -> Transfer:
        with self._lock:
            t = self._transfers.get(transfer_id)
        if t is None:
            raise KeyError(f"unknown transfer {transfer_id!r} on {self.worker_id}")
        self._expire(t)
        return t

    # ----------------------------------------------------------- transitions
    def _advance(self, t: Transfer, status: TransferStatus) -> bool:
        """Move forward to a non-final status; False if already done (or later)."""
        with self._lock:
            if t.status.done:
                return False
            if status > t.status:
                t.status = status
            return True

    def _fail(self, t: Transfer, reason: str) -> bool:
        """FAILED with ``reason`` unless already done; wakes the transfer's waiters."""
        with self._lock:
            if t.status.done:
                return False
            t.status, t.error = TransferStatus.FAILED, reason
        t.cancelled.set()
        return True

    def _succeed(self, t: Transfer) -> bool:
        with self._lock:
            if t.status.done:
                return False
            t.status = TransferStatus.SUCCESS
        t.cancelled.set()  # nothing left to wait for
        return True

    def _expire(self, t: Transfer) -> bool:
        """Fail ``t`` if its deadline passed; True if it is (now) FAILED."""
        if not t.status.done and t.remaining() <= 0:
            self._fail(t, f"timed out after {t.timeout_s:g}s in {t.status.name}")
        return t.status == TransferStatus.FAILED

    # ------------------------------------------------------------ the secret
    def _proof(self, transfer_id: str, nbytes: int) -> str | None:
        """Sender: this side's proof for a transfer (None without a secret)."""
        if self._secret is None:
            return None
        return transfer_proof(self._secret, transfer_id, self.worker_id, nbytes)

    def _authenticate(self, transfer_id: str, sender_id: str, nbytes: int, proof: object) -> str | None:
        """Receiver: None if the push may go on, else why it is refused.

        Checked before anything else about the push (the refusal of an
        unauthenticated peer says nothing about which transfers exist). A refused push fails the
        transfer of that id this side expects, if it is still running.
        """
        if self._secret is None:
            return None
        if proof_matches(self._secret, transfer_id, sender_id, nbytes, proof):
            return None
        with self._lock:
            self._stats["refused_unauthenticated"] += 1
            t = self._transfers.get(transfer_id)
        log.warning("%s refused a push of %r from %r: %s", self.worker_id, transfer_id[:128], sender_id[:128],
                    SECRET_REFUSED)
        if t is not None and t.role == "recv":
            self._fail(t, f"{SECRET_REFUSED} (a push claiming to be from {sender_id[:128]!r})")
        return f"refused by {self.worker_id}: {SECRET_REFUSED}"

    def _count(self, role: Role, nbytes: int, chunks: int = 1) -> None:
        with self._lock:
            key = "sent" if role == "send" else "received"
            self._stats[f"chunks_{key}"] += chunks
            self._stats[f"bytes_{key}"] += nbytes

    def stats(self) -> dict[str, int]:
        """Counters since construction: chunks and bytes sent and received."""
        with self._lock:
            return dict(self._stats)

    # ---------------------------------------------------------------- threads
    def _spawn(self, fn: Callable[..., None], *args: Any, name: str) -> threading.Thread:
        """Run ``fn`` in a tracked daemon thread; ``close`` joins it (bounded).

        An exception escaping ``fn`` fails the transfer passed as its first
        argument (a bug or a dead peer must end as FAILED, not as a stuck
        status and a traceback).
        """
        def run() -> None:
            try:
                fn(*args)
            except Exception as e:
                if args and isinstance(args[0], Transfer):
                    self._fail(args[0], f"{type(e).__name__}: {e}")
                else:
                    raise
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        th = threading.Thread(target=run, name=f"kvt-{self.worker_id}-{name}", daemon=True)
        with self._lock:
            self._threads.add(th)
        th.start()
        return th

    def _start_send_faults(self, t: Transfer) -> bool:
        """Apply the injected faults; False if the send must stop here.

        A send that must be dropped gets ``t.scratch["drop"] = True``; the
        backend honours it at the point where its bytes would leave.
        """
        why, t.scratch["drop"] = self._faults.begin_send()
        if why is not None:
            self._fail(t, why)
            return False
        if self._faults.delay_s > 0:
            t.cancelled.wait(min(self._faults.delay_s, max(t.remaining(), 0.0)))
        return not self._expire(t)

    # ---------------------------------------------------- KVTransport methods
    def poll(self, transfer_id: str) -> TransferStatus:
        return self._get(transfer_id).status

    def error(self, transfer_id: str) -> str | None:
        return self._get(transfer_id).error

    def result(self, transfer_id: str) -> torch.Tensor:
        t = self._get(transfer_id)
        if t.role != "recv":
            raise ValueError(f"{transfer_id!r} is sent by this side; only receivers have a result")
        if t.status == TransferStatus.FAILED:
            raise TransferError(f"transfer {transfer_id!r} failed: {t.error}")
        if t.status != TransferStatus.SUCCESS:
            raise RuntimeError(f"transfer {transfer_id!r} is not finished ({t.status.name})")
        self.forget(transfer_id)
        return t.tensor

    def abort(self, transfer_id: str) -> None:
        """FAILED now if still running; unknown or finished transfers are left alone."""
        t = self._find(transfer_id)
        if t is not None and self._fail(t, "aborted"):
            self._on_abort(t)

    def forget(self, transfer_id: str) -> None:
        t = self._find(transfer_id)
        if t is None:
            return
        self.abort(transfer_id)  # a live transfer must not keep writing into a dropped buffer
        with self._lock:
            if self._transfers.get(transfer_id) is t:
                del self._transfers[transfer_id]
        self._on_forget(t)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = [t for t in self._transfers.values() if not t.status.done]
        for t in live:
            if self._fail(t, "transport closed"):
                self._on_abort(t)
        deadline = time.monotonic() + 5.0
        while True:
            with self._lock:
                threads = [th for th in self._threads if th is not threading.current_thread()]
            if not threads or time.monotonic() > deadline:
                break
            threads[0].join(timeout=max(0.0, deadline - time.monotonic()))
        self._close_backend()

    # ------------------------------------------------------------------ hooks
    def _on_abort(self, t: Transfer) -> None:
        """Called once after ``t`` was failed by ``abort``/``close`` (tell the peer)."""

    def _on_forget(self, t: Transfer) -> None:
        """Called after ``t`` left the table (drop backend state)."""

    def _close_backend(self) -> None:
        """Release servers, sockets and groups (threads are joined afterwards)."""
