"""Helpers of the torch.distributed backend: store control plane and pair groups.

Why a control plane at all: a gloo send/recv cannot be cancelled (``Work``
has no ``abort``), a gloo ``wait(timeout)`` that times out *closes the whole
pair* ("Application timeout caused pair closure"), and a send whose size
differs from the posted recv terminates the process (``gloo::EnforceNotMet``).
So :mod:`kvtransfer.torch_dist` never posts a gloo/NCCL op until both sides
have agreed, through the receiver's ``TCPStore``, that this transfer happens,
with which size, tag, group generation and sequence number. The store only
ever holds small JSON strings (never pickles).

A *pair group* is a 2-rank process group (receiver rank 0, sender rank 1)
built directly from ``ProcessGroupGloo``/``ProcessGroupNCCL`` over a
``PrefixStore`` of the receiver's store: no ``init_process_group``, no
static world, so pools can grow. After any error inside a group both sides
drop it and the next transfer builds generation ``gen + 1``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from kvtransfer.transport_base import Transfer

T = TypeVar("T")

# A value no writer ever stores: compare_set(key, _ABSENT, _ABSENT) never
# writes and returns the current value, or _ABSENT when the key is missing,
# which makes it a read that cannot block (TCPStore.get waits for the key).
_ABSENT = "\x00absent"
_POLL_MIN_S, _POLL_MAX_S = 0.0002, 0.001  # completion is noticed within ~1 ms: it adds to TTFT


def store_read(store: dist.Store, key: str) -> dict[str, Any] | None:
    """The JSON value under ``key``, or None if there is none (never blocks)."""
    raw = store.compare_set(key, _ABSENT, _ABSENT)
    return None if raw == _ABSENT.encode() else json.loads(raw)


def store_claim(store: dist.Store, key: str, value: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Write ``value`` under ``key`` only if the key is absent: (won, value now there)."""
    mine = json.dumps(value, sort_keys=True)
    raw = store.compare_set(key, "", mine)
    return raw == mine.encode(), json.loads(raw)


def store_put(store: dist.Store, key: str, value: dict[str, Any]) -> None:
    store.set(key, json.dumps(value, sort_keys=True))


def poll(fn: Callable[[], T | None], t: Transfer, until: float) -> T | None:
    """Call ``fn`` with backoff until it returns a value, ``t`` is done, or ``until``.

    Polling (not ``TCPStore.wait``) because a blocking wait holds the store
    client's lock for its whole duration and would stall every other thread
    sharing that client.
    """
    delay = _POLL_MIN_S
    while True:
        value = fn()
        if value is not None or t.status.done or time.monotonic() >= until:
            return value
        t.cancelled.wait(min(delay, max(until - time.monotonic(), 0.0)))
        delay = min(delay * 2, _POLL_MAX_S)


def await_accept(store: dist.Store, accept_key: str, dkey: str, deadline: float,
                 closed: Callable[[], bool]) -> dict[str, Any] | None:
    """Sender, before joining a new pair group: None once the receiver joins too.

    The receiver writes ``accept_key`` right before it joins (we consume
    it); if it fails the transfer instead, ``dkey`` leaves "go" and that
    record is returned. ``{"s": "timeout"|"closed", "why": ...}`` when the
    deadline passes or the transport closes first. Does not stop on abort:
    the transfer is committed, and the receiver's ops must find their match.
    """
    delay = _POLL_MIN_S
    while True:
        if store.check([accept_key]):
            store.delete_key(accept_key)
            return None
        value = store_read(store, dkey)
        if value is not None and value.get("s") != "go":
            return value
        if closed():
            return {"s": "closed", "why": "transport closed"}
        if time.monotonic() >= deadline:
            return {"s": "timeout", "why": "timed out waiting for the receiver to join the pair group"}
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)


def new_group(backend: str, host: str, port: int, prefix: str, rank: int, timeout_s: float,
              gloo_device: Any = None) -> Any:
    """Build one 2-rank group over the store at host:port; blocks until the peer joins.

    Each group gets its own store client whose timeout bounds the rendezvous
    (the shared control client must not be blocked by it).
    """
    timeout = timedelta(seconds=max(timeout_s, 0.001))
    client = dist.TCPStore(host, port, None, False, timeout, wait_for_workers=False)
    store = dist.PrefixStore(prefix, client)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._threads = 1  # its worker threads serve collectives; we only send/recv
        if gloo_device is not None:
            opts._devices = [gloo_device]
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    from torch.distributed import ProcessGroupNCCL  # absent from CPU builds of torch

    opts = ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return ProcessGroupNCCL(store, rank, 2, opts)


def wait_works(backend: str, works: list[Any], deadline: float) -> None:
    """Wait for every work until ``deadline``; raise on error or timeout.

    gloo: ``Work.wait(timeout)`` blocks the thread (a timeout closes the pair,
    which we then drop). NCCL: ``wait`` only orders CUDA streams, so poll
    ``is_completed`` on the host; the caller aborts the group on timeout.
    """
    for work in works:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("transfer deadline passed with data still in flight")
        if backend == "gloo":
            work.wait(timedelta(seconds=remaining))
            continue
        while not work.is_completed():  # True on completion *or* on a recorded NCCL error
            if time.monotonic() >= deadline:
                raise TimeoutError("transfer deadline passed with data still in flight")
            time.sleep(0.0005)
        work.wait()  # raises that error, if any (WorkNCCL.is_success is deprecated and throws)


class SendPair:
    """The sender's side of one pair group (to one receiver instance).

    ``lock`` is held from claiming the transfer's sequence number until its
    sends are posted, so the order of ``seq`` is the order of ops on the wire:
    NCCL ignores tags and matches send/recv purely by order.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gen: int | None = None
        self.seq = 0
        self.group: Any = None
        self.broken: str | None = None

    def reset(self, gen: int) -> None:
        self.gen, self.seq, self.group, self.broken = gen, 0, None, None


class RecvPair:
    """The receiver's side of one pair group, for one generation.

    Transfers post their recvs strictly in the sender's ``seq`` order: each
    waits on ``cond`` until ``next_seq`` is its own.
    """

    def __init__(self, gen: int) -> None:
        self.gen = gen
        self.cond = threading.Condition()
        self.next_seq = 0
        self.group: Any = None
        self.broken: str | None = None

    def break_(self, why: str) -> None:
        with self.cond:
            if self.broken is None:
                self.broken = why
            self.group = None  # dropping it closes its sockets: the sender's ops fail fast
            self.cond.notify_all()
