"""torch.distributed backend (gloo on CPU, NCCL on GPU) without a static world.

Each transport hosts a ``TCPStore`` server (the *control plane*, see
:mod:`kvtransfer.torch_pairs` for why one is needed) and each (sender,
receiver) pair lazily builds its own 2-rank process group over a prefix of
the receiver's store, so workers can join and leave at any time. Lifecycle
of one transfer (every wait bounded by the transfer's deadline):

1. The receiver ``expect``\\ s: it allocates the destination and registers
   ``kv/x/<id> = {tag, nbytes, sender}`` in its own store (BOOTSTRAPPING, or
   WAITING when a group with that sender is already up).
2. The sender ``send``\\ s; its thread connects to the receiver's store and
   polls for the registration. None within ``expect_grace_s``: refused. A
   size or sender mismatch: refused before any op is posted.
3. Under the pair lock the sender claims ``kv/d/<id> = go{gen, seq, chunk}``
   with compare-and-set. The receiver claims the same key with ``rabort`` when
   it aborts or times out first, so exactly one of "go" and "abort" wins and a
   gloo op is only ever posted when both sides will post its match.
4. Both sides build the pair group of generation ``gen`` if they lack it
   (BOOTSTRAPPING), post the chunks as send/recv with the transfer's tag, in
   ``seq`` order (TRANSFERRING), and wait for them.
5. The receiver acknowledges with ``kv/d/<id> = done`` (SUCCESS), and the
   sender is SUCCESS once it reads that. Any error inside the group marks the
   generation broken on both sides (``kv/pair/<pair>/broken/<gen>``); the
   next transfer builds a new one. An abort after "go" cannot cancel a gloo op:
   the side gives up (FAILED) but its thread still drains the op.

Before it joins a *new* pair group the sender waits for the receiver's
``kv/pair/<pair>/accept/<gen>`` marker (or its refusal in ``kv/d/<id>``),
so a refused sender fails at once instead of blocking in the group's
rendezvous until its deadline.

Where the store listens: on ``host`` only (``kvtransfer.host`` in the
config), never on every interface (:func:`~kvtransfer.torch_pairs.listening_store`);
gloo's sockets bind the same interface.

The cluster secret (``secret=``, see :mod:`kvtransfer.push_proof`): the sender
puts its proof in the "go" record of step 3; the receiver checks it before
it joins a group or posts a recv. A wrong or missing proof fails the
transfer on the receiver ("peer did not present the cluster secret"), is
answered with ``rfail`` (the sender fails at once), and no byte moves.
Besides, with a secret every record in the store that steers a transfer
(the registration with its tag, size and sender; "go" with its generation,
sequence and chunk size; the rabort/sabort/rfail/done answers; the accept
and broken markers) is sealed with it (:class:`~kvtransfer.torch_pairs.RecordSeal`),
bound to its key. A record that fails its seal is refused: the receiver fails
that transfer with a clear error and answers ``rfail``; the sender fails it,
or ignores a bad answer and waits for the real one; nothing crashes and no op
is posted on a forged size, chunk, generation or sequence. A sender checks
the seals of a receiver whose endpoint says ``sealed`` (it has a secret).

The store's growth is bounded: a transfer's records are deleted when read,
or, for the last answer of a transfer (which a late peer may still need),
``timeout_s + expect_grace_s`` after it ended; a gloo group's rendezvous keys
and broken marker once a newer generation supersedes it.
So the store holds about one record per live or recently ended transfer, one
generation counter per sender instance, and a few keys per NCCL group.

What the secret does *not* cover: the ``TCPStore`` server itself has no
authentication. Anyone who can reach its port can still delete keys or write
junk (which stalls or refuses transfers until their deadline, with a clear
error, but cannot steer them), read the registrations, tie up the store, or
race the gloo / NCCL rendezvous of a new pair group (the data plane is not
authenticated either). Keep ``host`` on 127.0.0.1 or a private cluster
network that only the workers reach; that, not the secret, is the mitigation
for an attacker on the network.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvtransfer.base import TransferStatus
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES, byte_view, chunk_ranges
from kvtransfer.endpoints import Endpoint, TorchDistEndpoint, narrow
from kvtransfer.faults import TransferFaults
from kvtransfer.push_proof import SECRET_REFUSED
from kvtransfer.torch_pairs import (BadRecord, RecordSeal, RecvPair, SendPair, await_accept, listening_store,
                                    new_group, poll, rendezvous_keys, store_claim, store_put, store_read,
                                    wait_works)
from kvtransfer.transport_base import Transfer, TransportBase

_PAIR_LOCK_POLL_S = 0.05
log = logging.getLogger(__name__)
_STORE_TIMEOUT_S = 30.0


def _int_field(record: dict[str, Any], name: str, low: int) -> int:
    """``record[name]`` if it is an int >= ``low``, else :class:`BadRecord` (never a crash further on)."""
    value = record.get(name)
    if type(value) is not int or value < low:
        raise BadRecord(f"bad {name!r} in store record: {value!r}")
    return value


def _pair_key(worker_id: str, instance: str) -> str:
    return f"{worker_id}/{instance}"


class TorchDistTransport(TransportBase):
    """KV transfer over torch.distributed point-to-point ops (see the module doc).

    ``host``/``port``: where this transport's ``TCPStore`` listens (port 0
    picks one; :meth:`endpoint` publishes it) and, for gloo, the interface its
    sockets bind. ``device``: where received tensors are allocated (a CUDA
    device for ``backend="nccl"``). ``expect_grace_s``: how long a sender
    waits for the receiver's ``expect`` before calling the transfer refused.
    ``secret``: the cluster secret this side proves and demands (module doc).
    """

    def __init__(self, worker_id: str, backend: str = "gloo", host: str = "127.0.0.1", port: int = 0, *,
                 device: str | torch.device = "cpu", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 expect_grace_s: float = 2.0, faults: TransferFaults | None = None,
                 secret: str | None = None) -> None:
        super().__init__(worker_id, faults, secret)
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', not {backend!r}")
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be > 0")
        self.backend, self.host, self.chunk_bytes = backend, host, chunk_bytes
        self.device = torch.device(device)
        if backend == "nccl" and (self.device.type != "cuda" or not dist.is_nccl_available()):
            raise ValueError("the nccl backend needs a CUDA device and a torch build with NCCL")
        self.expect_grace_s = expect_grace_s
        self.instance = uuid.uuid4().hex  # a restarted worker is a new peer: no stale groups
        self._store = listening_store(host, port, _STORE_TIMEOUT_S)  # on `host` only, not every interface
        self.port = self._store.port
        self._seal = RecordSeal(self._secret)
        # transfer id -> when its leftover records (kv/d, kv/x) may be deleted from our store;
        # until then a late peer must still find them (see _tombstone).
        self._tombstones: dict[str, float] = {}
        self._gloo_device = dist.ProcessGroupGloo.create_device(hostname=host) if backend == "gloo" else None
        self._tags = itertools.count(1)
        self._clients: dict[str, dist.TCPStore] = {}  # receiver "host:port/instance" -> control client
        self._send_pairs: dict[str, SendPair] = {}  # receiver "host:port/instance" -> pair
        self._recv_pairs: dict[str, RecvPair] = {}  # sender pair key -> pair
        self._pairs_lock = threading.Lock()

    def endpoint(self) -> TorchDistEndpoint:
        # Endpoints travel through the router, not the store: whoever reaches the store cannot flip "sealed".
        return TorchDistEndpoint(worker_id=self.worker_id, backend=self.backend, host=self.host, port=self.port,
                                 instance=self.instance, sealed=self._secret is not None)

    # ---------------------------------------------------------- receiver side
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        sender = _pair_key(peer.worker_id, narrow(peer, TorchDistEndpoint).instance)  # ValueError if not ours
        with self._pairs_lock:
            pair = self._recv_pairs.get(sender)
            ready = pair is not None and pair.group is not None and pair.broken is None
        dst = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        t = self._new_transfer(transfer_id, "recv", peer, timeout_s, dst,
                               TransferStatus.WAITING if ready else TransferStatus.BOOTSTRAPPING)
        t.scratch.update(sender=sender, tag=next(self._tags) % (1 << 31))
        self._purge_tombstones()
        with self._pairs_lock:
            self._tombstones.pop(transfer_id, None)  # this id is live again: its records are not leftovers
        self._store.delete_key(f"kv/d/{transfer_id}")  # a leftover of an earlier use of this id
        store_put(self._store, f"kv/x/{transfer_id}", {"tag": t.scratch["tag"], "nbytes": t.nbytes, "sender": sender},
                  self._seal)
        self._spawn(self._run_recv, t, name=f"recv-{transfer_id}")

    def _run_recv(self, t: Transfer) -> None:
        store, dkey = self._store, f"kv/d/{t.transfer_id}"  # local ref: close() may drop self._store
        try:
            self._recv_steps(t, store, dkey)
        finally:
            self._tombstone(t)

    def _recv_steps(self, t: Transfer, store: dist.TCPStore, dkey: str) -> None:
        try:
            go = poll(lambda: store_read(store, dkey, self._seal), t, t.deadline)
            if go is None:  # aborted or timed out before the sender committed: try to call it off
                self._expire(t)
                won, go = store_claim(store, dkey, {"s": "rabort", "why": t.error or "aborted"}, self._seal)
                if won:
                    store.delete_key(f"kv/x/{t.transfer_id}")
                    return
            store.delete_key(f"kv/x/{t.transfer_id}")  # consumed: a second sender is refused
            if go.get("s") != "go":
                self._fail(t, f"sender gave up: {go.get('why')}")
                store.delete_key(dkey)
                return
            why = self._authenticate(t.transfer_id, t.peer.worker_id, t.nbytes, go.get("proof"))
            if why is None:
                steering = (_int_field(go, "gen", 1), _int_field(go, "seq", 0), _int_field(go, "chunk", 1))
        except BadRecord as e:  # forged or altered: refuse it before it can steer a gloo op
            why = self._refuse_record(t, e)
        if why is not None:  # fails t; the sender reads the refusal before it joins a group or posts a send
            # The refusal is written before t is failed, so whoever sees t FAILED
            # also finds the refusal in the store (a test did see the old "go").
            store.delete_key(f"kv/x/{t.transfer_id}")
            store_put(store, dkey, {"s": "rfail", "why": why}, self._seal)
            self._fail(t, why)
            with self._pairs_lock:
                pair = self._recv_pairs.get(t.scratch["sender"])
            if pair is not None:  # the sender may have posted its sends already: they must not match a later recv
                self._break_recv_pair(t.scratch["sender"], pair, why)
            return
        # Committed: from here the recvs are posted (or the pair is broken) even
        # if this side aborts meanwhile, so the sender's ops never dangle.
        why = self._receive(t, *steering)
        ok = why is None and not t.status.done
        store_put(store, dkey, {"s": "done"} if ok else {"s": "rfail", "why": why or t.error}, self._seal)
        if ok:
            self._count("recv", t.nbytes, len(chunk_ranges(t.nbytes, steering[2])))
            self._succeed(t)
        else:
            self._fail(t, why or "aborted")

    def _refuse_record(self, t: Transfer, e: BadRecord) -> str:
        """Why a transfer whose store record failed its seal or its checks is refused (counted like a bad proof)."""
        with self._lock:
            self._stats["refused_unauthenticated"] += 1
        log.warning("%s refused %r: %s", self.worker_id, t.transfer_id[:128], e)
        return f"refused by {self.worker_id}: {SECRET_REFUSED} ({e})" if self._secret is not None \
            else f"refused by {self.worker_id}: {e}"

    def _tombstone(self, t: Transfer) -> None:
        """Schedule the deletion of a finished receive's records.

        The last record of a transfer (``rabort``, ``done``, ``rfail``) must
        stay until the sender can have read it: a sender that read the
        registration before this side gave up claims within its own deadline,
        and both sides' deadlines come from the same ``timeout_s``. After that
        (plus the expect grace) nobody reads them, and they are deleted, so
        the store holds records of live and recent transfers only.
        """
        with self._pairs_lock:
            self._tombstones[t.transfer_id] = time.monotonic() + t.timeout_s + self.expect_grace_s
        self._purge_tombstones()

    def _purge_tombstones(self) -> None:
        now, store = time.monotonic(), self._store
        with self._pairs_lock:
            due = [tid for tid, at in self._tombstones.items() if at <= now]
            for tid in due:
                del self._tombstones[tid]
        if store is None:
            return
        for tid in due:
            with self._lock:
                live = tid in self._transfers and self._transfers[tid].role == "recv" \
                    and not self._transfers[tid].status.done
            if not live:
                store.delete_key(f"kv/d/{tid}")
                store.delete_key(f"kv/x/{tid}")

    def _recv_pair(self, sender: str, gen: int) -> RecvPair | None:
        with self._pairs_lock:
            pair = self._recv_pairs.get(sender)
            if pair is None or pair.gen < gen:
                if pair is not None:
                    pair.break_(f"superseded by generation {gen}")
                    # The sender sealed a newer generation: nobody uses the old one's keys any more.
                    store = self._store  # None once closed
                    for key in [*rendezvous_keys(self.backend, f"kv/pair/{sender}/g{pair.gen}"),
                                f"kv/pair/{sender}/broken/{pair.gen}"] if store is not None else []:
                        store.delete_key(key)
                pair = self._recv_pairs[sender] = RecvPair(gen)
            return pair if pair.gen == gen else None

    def _receive(self, t: Transfer, gen: int, seq: int, chunk: int) -> str | None:
        """Post this transfer's recvs in its turn and wait for them; returns why it failed."""
        sender = t.scratch["sender"]
        pair = self._recv_pair(sender, gen)
        if pair is None:
            return f"stale group generation {gen}"
        with pair.cond:
            turn = pair.cond.wait_for(lambda: pair.broken is not None or pair.next_seq == seq,
                                      timeout=max(t.remaining(), 0.0))
            if pair.broken is not None:
                return f"pair group broken: {pair.broken}"
            if not turn:
                why = "timed out waiting for earlier transfers of this pair"
                self._break_recv_pair(sender, pair, why)
                return why
        # Our turn: later transfers of this pair wait until our recvs are posted.
        try:
            if pair.group is None:
                store_put(self._store, f"kv/pair/{sender}/accept/{gen}", {}, self._seal)  # the sender may join now
                pair.group = new_group(self.backend, self.host, self.port, f"kv/pair/{sender}/g{gen}", 0,
                                       t.remaining(), self._gloo_device)
            self._advance(t, TransferStatus.TRANSFERRING)
            dst = byte_view(t.tensor)
            works = [pair.group.recv([dst[off:off + n]], 1, t.scratch["tag"])
                     for off, n in chunk_ranges(t.nbytes, chunk) if n]
        except Exception as e:
            why = f"{self.backend} recv failed: {e}"
            self._break_recv_pair(sender, pair, why)
            return why
        finally:
            with pair.cond:
                pair.next_seq += 1
                pair.cond.notify_all()
        try:
            wait_works(self.backend, works, t.deadline)
        except Exception as e:
            why = f"{self.backend} recv failed: {e}"
            self._break_recv_pair(sender, pair, why)
            return why
        return None

    def _break_recv_pair(self, sender: str, pair: RecvPair, why: str) -> None:
        group, store = pair.group, self._store
        pair.break_(why)
        if group is not None and self.backend == "nccl":
            group.abort()  # frees NCCL's pending kernels; gloo just closes its sockets when dropped
        if store is not None:  # None once closed
            store_put(store, f"kv/pair/{sender}/broken/{pair.gen}", {"why": why}, self._seal)

    # ------------------------------------------------------------ sender side
    def send(self, transfer_id: str, tensor: torch.Tensor, peer: Endpoint, timeout_s: float) -> None:
        t = self._new_transfer(transfer_id, "send", peer, timeout_s, tensor.contiguous())
        self._spawn(self._run_send, t, name=f"send-{transfer_id}")

    def _client(self, peer: str, host: str, port: int, timeout_s: float) -> dist.TCPStore:
        with self._pairs_lock:
            client = self._clients.get(peer)
        if client is None:  # connect outside the lock: it can take up to timeout_s
            client = dist.TCPStore(host, port, None, False, timedelta(seconds=max(timeout_s, 0.001)),
                                   wait_for_workers=False)
            with self._pairs_lock:
                client = self._clients.setdefault(peer, client)
        return client

    def _run_send(self, t: Transfer) -> None:
        if not self._start_send_faults(t):
            return
        try:
            ep = narrow(t.peer, TorchDistEndpoint)
            peer = f"{ep.host}:{ep.port}/{ep.instance}"
            store = self._client(peer, ep.host, ep.port, t.remaining())
        except Exception as e:  # another backend's endpoint, peer unreachable
            self._fail(t, f"cannot reach the store of {t.peer.worker_id}: {e}")
            return
        try:
            self._send_via(t, store, peer, ep)
        except Exception:  # the peer's store went away: do not reuse this client
            with self._pairs_lock:
                if self._clients.get(peer) is store:
                    del self._clients[peer]
            raise  # _spawn fails the transfer with this error

    def _sealed_by(self, peer: TorchDistEndpoint) -> bool:
        """Whether the records of the receiver ``peer`` must carry a good seal (we and it have a secret)."""
        return self._secret is not None and peer.sealed

    def _sabort(self, store: dist.TCPStore, dkey: str, why: str | None, required: bool) -> None:
        """Call the transfer off in the receiver's store (unless the receiver already decided)."""
        try:
            store_claim(store, dkey, {"s": "sabort", "why": why}, self._seal, required)
        except BadRecord:
            pass  # someone else's junk is there; the receiver refuses it by itself

    def _send_via(self, t: Transfer, store: dist.TCPStore, peer: str, ep: TorchDistEndpoint) -> None:
        """Steps 2-5 of the module doc for one send, over the store ``store`` of ``ep`` (pair key ``peer``)."""
        me = _pair_key(self.worker_id, self.instance)
        dkey = f"kv/d/{t.transfer_id}"
        sealed = self._sealed_by(ep)
        grace = min(t.deadline, t.deadline - t.timeout_s + self.expect_grace_s)
        try:
            reg = poll(lambda: store_read(store, f"kv/x/{t.transfer_id}", self._seal, sealed), t, grace)
            if reg is not None:
                tag, nbytes = _int_field(reg, "tag", 0), _int_field(reg, "nbytes", 0)
        except BadRecord as e:  # forged or altered: do not let it steer our ops
            why = f"refused: {SECRET_REFUSED} (the registration of {t.transfer_id!r} by {ep.worker_id}: {e})"
            self._sabort(store, dkey, why, sealed)
            self._fail(t, why)
            return
        if reg is None:
            if not self._expire(t):
                self._fail(t, f"refused: {ep.worker_id} does not expect {t.transfer_id!r}")
            return
        if reg.get("sender") != me:  # not ours to call off: the expected sender may still come
            self._fail(t, f"refused: {t.transfer_id!r} is expected from {reg.get('sender')}, not {me}")
            return
        if nbytes != t.nbytes:  # a gloo op of the wrong size would abort the process
            why = f"size mismatch: sender has {t.nbytes} bytes, receiver expects {nbytes}"
            self._sabort(store, dkey, why, sealed)
            self._fail(t, why)
            return
        with self._pairs_lock:
            pair = self._send_pairs.setdefault(peer, SendPair())
        while not pair.lock.acquire(timeout=_PAIR_LOCK_POLL_S):
            if self._expire(t) or t.status.done:
                self._sabort(store, dkey, t.error, sealed)
                return
        try:
            works = self._commit_and_post(t, store, pair, me, tag, sealed, ep)
        finally:
            pair.lock.release()
        if works is None:
            return
        try:
            wait_works(self.backend, works, t.deadline)
        except Exception as e:
            self._break_send_pair(pair, f"{self.backend} send failed: {e}")
            self._fail(t, f"{self.backend} send failed: {e}")
            return
        self._count("send", t.nbytes, len(chunk_ranges(t.nbytes, self.chunk_bytes)))

        def final_ack() -> dict[str, Any] | None:  # "go" until the receiver writes done/rfail
            try:
                value = store_read(store, dkey, self._seal, sealed)
            except BadRecord:  # not the receiver's: only its own sealed answer counts
                return None
            return None if value is None or value.get("s") == "go" else value

        ack = poll(final_ack, t, t.deadline)
        if ack is None:
            self._expire(t)
            return
        store.delete_key(dkey)
        if ack["s"] == "done":
            self._succeed(t)
        else:
            self._fail(t, f"receiver failed: {ack.get('why')}")

    def _receiver_broke(self, store: dist.TCPStore, gen_key: str, gen: int | None, sealed: bool) -> bool:
        """Whether the receiver marked generation ``gen`` broken (a marker that fails its seal does not count)."""
        if gen is None:
            return False
        key = f"{gen_key}/broken/{gen}"
        try:
            broken = store_read(store, key, self._seal, sealed) is not None
        except BadRecord:
            broken = False
            store.delete_key(key)
        if broken:
            store.delete_key(key)  # read: we start a new generation now, nobody needs it any more
        return broken

    def _commit_and_post(self, t: Transfer, store: dist.TCPStore, pair: SendPair, me: str,
                         tag: int, sealed: bool, ep: TorchDistEndpoint) -> list[Any] | None:
        """Under the pair lock: claim "go", build the group if needed, post the sends."""
        gen_key = f"kv/pair/{me}"
        if pair.gen is None or pair.broken is not None or self._receiver_broke(store, gen_key, pair.gen, sealed):
            pair.reset(int(store.add(f"{gen_key}/gen", 1)))
        if self._expire(t) or t.status.done:
            self._sabort(store, f"kv/d/{t.transfer_id}", t.error, sealed)
            return None
        # Every field that steers the receiver's ops travels sealed (with a secret).
        go: dict[str, Any] = {"s": "go", "gen": pair.gen, "seq": pair.seq, "chunk": self.chunk_bytes}
        proof = self._proof(t.transfer_id, t.nbytes)
        if proof is not None:
            go["proof"] = proof
        try:
            won, now = store_claim(store, f"kv/d/{t.transfer_id}", go, self._seal, sealed)
        except BadRecord as e:
            self._fail(t, f"refused: {SECRET_REFUSED} (the receiver's record of {t.transfer_id!r}: {e})")
            return None
        if not won:
            self._fail(t, f"receiver gave up: {now.get('why')}")
            return None
        pair.seq += 1
        if t.scratch["drop"]:  # committed, then the bytes are lost: the receiver's recv times out
            pair.broken = "injected drop"
            self._advance(t, TransferStatus.TRANSFERRING)
            return None
        try:
            if pair.group is None:
                # Committed, so no early exit on abort: wait for the receiver to join or refuse.
                refusal = await_accept(store, f"{gen_key}/accept/{pair.gen}", f"kv/d/{t.transfer_id}", t.deadline,
                                       lambda: self._closed, self._seal, sealed)
                if refusal is not None:
                    if refusal.get("s") == "rfail":  # the receiver did not join: a new generation next time
                        why = f"receiver failed: {refusal.get('why')}"
                        pair.broken = why
                        store.delete_key(f"kv/d/{t.transfer_id}")
                    else:  # timed out or closed: this generation is dead (the next go names a newer one)
                        why = str(refusal.get("why"))
                        self._break_send_pair(pair, why)
                    self._fail(t, why)
                    return None
                pair.group = new_group(self.backend, ep.host, ep.port, f"{gen_key}/g{pair.gen}",
                                       1, t.remaining(), self._gloo_device)
            self._advance(t, TransferStatus.TRANSFERRING)
            data = t.tensor if t.tensor.device == self.device else t.tensor.to(self.device)
            src = byte_view(data)
            t.scratch["src"] = src  # keep the (possibly moved) payload alive until the ops finish
            return [pair.group.send([src[off:off + n]], 0, tag) for off, n in chunk_ranges(t.nbytes, self.chunk_bytes)
                    if n]
        except Exception as e:
            self._break_send_pair(pair, f"{self.backend} send failed: {e}")
            self._fail(t, f"{self.backend} send failed: {e}")
            return None

    def _break_send_pair(self, pair: SendPair, why: str) -> None:
        """Drop our side of the pair; the receiver learns it from the next "go", which names a newer generation."""
        group = pair.group
        pair.broken = why
        if group is not None and self.backend == "nccl":
            group.abort()

    def _close_backend(self) -> None:
        with self._pairs_lock:
            for pair in self._recv_pairs.values():
                pair.break_("transport closed")
            self._recv_pairs.clear()
            self._send_pairs.clear()
            self._clients.clear()
        self._store = None  # type: ignore[assignment]  # the last reference: stops the server
