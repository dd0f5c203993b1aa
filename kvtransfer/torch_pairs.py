"""Helpers of the torch.distributed backend: store control plane and pair groups.

Why a control plane at all: a gloo send/recv cannot be cancelled (``Work``
has no ``abort``), a gloo ``wait(timeout)`` that times out *closes the whole
pair* ("Application timeout caused pair closure"), and a send whose size
differs from the posted recv terminates the process (``gloo::EnforceNotMet``).
So :mod:`kvtransfer.torch_dist` never posts a gloo/NCCL op until both sides
have agreed, through the receiver's ``TCPStore``, that this transfer happens,
with which size, tag, group generation and sequence number. The store only
ever holds small JSON strings (never pickles).

Every record that steers a transfer (the registration, "go" with its
generation, sequence and chunk size, the acknowledgements, the accept and
broken markers) is sealed with the cluster secret when there is one
(:class:`RecordSeal`): an HMAC over the record's key and every field, so a
record written or altered by someone without the secret is refused
(:class:`BadRecord`) instead of steering a gloo op. The seal binds the key,
so a sealed record cannot be moved to another transfer or pair either.

A *pair group* is a 2-rank process group (receiver rank 0, sender rank 1)
built directly from ``ProcessGroupGloo``/``ProcessGroupNCCL`` over a
``PrefixStore`` of the receiver's store: no ``init_process_group``, no
static world, so pools can grow. After any error inside a group both sides
drop it and the next transfer builds generation ``gen + 1``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
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


_SEAL_CONTEXT = b"splitserve-kvtransfer-store-record-v1\0"  # domain separation from the push proof
_MAC = "mac"


class BadRecord(ValueError):
    """A store record that is not valid JSON, not sealed, or whose seal does not match its key and fields."""


class RecordSeal:
    """Seals store records with the cluster secret and checks the seals of records read.

    Without a secret, :meth:`seal` adds nothing and :meth:`open` takes any
    record (the behaviour without secrets). ``open(..., required=False)``
    also takes an unsealed record: a sender uses it for a receiver whose
    endpoint says it has no secret.
    """

    def __init__(self, secret: bytes | None) -> None:
        self._secret = secret

    def _mac(self, key: str, fields: dict[str, Any]) -> str:
        assert self._secret is not None
        msg = json.dumps([key, fields], sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._secret, _SEAL_CONTEXT + msg, hashlib.sha256).hexdigest()

    def seal(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        return dict(value) if self._secret is None else {**value, _MAC: self._mac(key, value)}

    def open(self, key: str, raw: bytes, required: bool = True) -> dict[str, Any]:
        """The record's fields (seal removed); :class:`BadRecord` if it must be sealed and is not."""
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise BadRecord(f"store record {key} is not a JSON object")
        mac = value.pop(_MAC, None)
        if self._secret is None or not required:
            return value
        if not (isinstance(mac, str) and mac.isascii() and hmac.compare_digest(self._mac(key, value), mac)):
            raise BadRecord(f"store record {key} is unsealed or altered (not written with the cluster secret)")
        return value


def store_read(store: dist.Store, key: str, seal: RecordSeal, required: bool = True) -> dict[str, Any] | None:
    """The record under ``key``, or None if there is none (never blocks); :class:`BadRecord` if it fails its seal."""
    raw = store.compare_set(key, _ABSENT, _ABSENT)
    return None if raw == _ABSENT.encode() else seal.open(key, raw, required)


def store_claim(store: dist.Store, key: str, value: dict[str, Any], seal: RecordSeal,
                required: bool = True) -> tuple[bool, dict[str, Any]]:
    """Write ``value`` (sealed) under ``key`` only if the key is absent: (won, record now there).

    Raises :class:`BadRecord` if the record that beat ours fails its seal.
    """
    mine = json.dumps(seal.seal(key, value), sort_keys=True)
    raw = store.compare_set(key, "", mine)
    if raw == mine.encode():
        return True, dict(value)
    return False, seal.open(key, raw, required)


def store_put(store: dist.Store, key: str, value: dict[str, Any], seal: RecordSeal) -> None:
    store.set(key, json.dumps(seal.seal(key, value), sort_keys=True))


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
                 closed: Callable[[], bool], seal: RecordSeal, required: bool) -> dict[str, Any] | None:
    """Sender, before joining a new pair group: None once the receiver joins too.

    The receiver writes ``accept_key`` right before it joins (we consume
    it); if it fails the transfer instead, ``dkey`` leaves "go" and that
    record is returned. ``{"s": "timeout"|"closed", "why": ...}`` when the
    deadline passes or the transport closes first. Does not stop on abort:
    the transfer is committed, and the receiver's ops must find their match.
    An accept marker or refusal that fails its seal is ignored (and a bad
    accept marker dropped): only the receiver can let the sender in or out.
    """
    delay = _POLL_MIN_S
    while True:
        try:
            accepted = store_read(store, accept_key, seal, required) is not None
        except BadRecord:
            accepted = False
            store.delete_key(accept_key)
        if accepted:
            store.delete_key(accept_key)
            return None
        try:
            value = store_read(store, dkey, seal, required)
        except BadRecord:
            value = None
        if value is not None and value.get("s") != "go":
            return value
        if closed():
            return {"s": "closed", "why": "transport closed"}
        if time.monotonic() >= deadline:
            return {"s": "timeout", "why": "timed out waiting for the receiver to join the pair group"}
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)


def listening_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A ``TCPStore`` server that listens on ``host`` only (port 0: a free one).

    Left to itself, ``TCPStore`` binds its server socket to every interface
    whatever ``host_name`` says; so we bind the socket to ``host`` ourselves
    and hand it over (``master_listen_fd``), and the store closes it.
    """
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(addr)
        sock.listen(512)
        bound = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    fd = sock.detach()
    try:
        return dist.TCPStore(host, bound, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                             master_listen_fd=fd)
    except Exception:
        os.close(fd)
        raise


def rendezvous_keys(backend: str, prefix: str) -> list[str]:
    """The keys a pair group of ``backend`` leaves under ``prefix`` in the store.

    gloo: each rank's address, under ``<device index>/<rank>``; gloo may read
    them again after the group is built, so they are deleted only once the
    generation is superseded. NCCL exchanges its unique id on the first op,
    under names of its own; those are not listed (and stay).
    """
    return [f"{prefix}/0/0", f"{prefix}/0/1"] if backend == "gloo" else []


def new_group(backend: str, host: str, port: int, prefix: str, rank: int, timeout_s: float,
              gloo_device: Any = None) -> Any:
    """Build one 2-rank group over the store at host:port; blocks until the peer joins.

    Each group gets its own store client whose timeout bounds the rendezvous
    (the shared control client must not be blocked by it). The group's
    rendezvous leaves keys under ``prefix`` (see :func:`rendezvous_keys`).
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
