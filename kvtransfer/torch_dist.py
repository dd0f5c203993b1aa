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

The cluster secret (``secret=``, see :mod:`kvtransfer.push_proof`): the sender
puts its proof in the "go" record of step 3; the receiver checks it before
it joins a group or posts a recv. A wrong or missing proof fails the
transfer on the receiver ("peer did not present the cluster secret"), is
answered with ``rfail`` (the sender fails at once), and no byte moves.

What the secret does *not* cover: the ``TCPStore`` itself (and the gloo /
NCCL rendezvous over it) has no authentication. The secret decides which
transfers this side accepts, but anyone who can reach the store's port can
read the registrations, write or delete keys (and so refuse or stall
transfers), or tie up the store. Keep ``host`` on 127.0.0.1 or a private
cluster network that only the workers reach; that, not the secret, is the
mitigation for an attacker on the network.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvtransfer.base import Endpoint, TransferStatus
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES, byte_view, chunk_ranges
from kvtransfer.faults import TransferFaults
from kvtransfer.torch_pairs import (RecvPair, SendPair, await_accept, new_group, poll, store_claim, store_put,
                                    store_read, wait_works)
from kvtransfer.transport_base import Transfer, TransportBase

_PAIR_LOCK_POLL_S = 0.05


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
        self._store = dist.TCPStore(host, port, None, True, timedelta(seconds=30), wait_for_workers=False)
        self.port = self._store.port
        self._gloo_device = dist.ProcessGroupGloo.create_device(hostname=host) if backend == "gloo" else None
        self._tags = itertools.count(1)
        self._clients: dict[str, dist.TCPStore] = {}  # receiver "host:port/instance" -> control client
        self._send_pairs: dict[str, SendPair] = {}  # receiver "host:port/instance" -> pair
        self._recv_pairs: dict[str, RecvPair] = {}  # sender pair key -> pair
        self._pairs_lock = threading.Lock()

    def endpoint(self) -> Endpoint:
        return {"worker_id": self.worker_id, "backend": self.backend, "host": self.host, "port": self.port,
                "instance": self.instance}

    # ---------------------------------------------------------- receiver side
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        if "instance" not in peer or "worker_id" not in peer:
            raise ValueError(f"not a TorchDistTransport endpoint (no worker_id/instance): {peer}")
        sender = _pair_key(str(peer["worker_id"]), str(peer["instance"]))
        with self._pairs_lock:
            pair = self._recv_pairs.get(sender)
            ready = pair is not None and pair.group is not None and pair.broken is None
        dst = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        t = self._new_transfer(transfer_id, "recv", peer, timeout_s, dst,
                               TransferStatus.WAITING if ready else TransferStatus.BOOTSTRAPPING)
        t.scratch.update(sender=sender, tag=next(self._tags) % (1 << 31))
        self._store.delete_key(f"kv/d/{transfer_id}")  # a leftover of an earlier use of this id
        store_put(self._store, f"kv/x/{transfer_id}", {"tag": t.scratch["tag"], "nbytes": t.nbytes, "sender": sender})
        self._spawn(self._run_recv, t, name=f"recv-{transfer_id}")

    def _run_recv(self, t: Transfer) -> None:
        store, dkey = self._store, f"kv/d/{t.transfer_id}"  # local ref: close() may drop self._store
        go = poll(lambda: store_read(store, dkey), t, t.deadline)
        if go is None:  # aborted or timed out before the sender committed: try to call it off
            self._expire(t)
            won, go = store_claim(store, dkey, {"s": "rabort", "why": t.error or "aborted"})
            if won:
                store.delete_key(f"kv/x/{t.transfer_id}")
                return
        store.delete_key(f"kv/x/{t.transfer_id}")  # consumed: a second sender is refused
        if go["s"] != "go":
            self._fail(t, f"sender gave up: {go.get('why')}")
            store.delete_key(dkey)
            return
        why = self._authenticate(t.transfer_id, str(t.peer["worker_id"]), t.nbytes, go.get("proof"))
        if why is not None:  # fails t; the sender reads the refusal before it joins a group or posts a send
            self._fail(t, why)
            store_put(store, dkey, {"s": "rfail", "why": why})
            return
        # Committed: from here the recvs are posted (or the pair is broken) even
        # if this side aborts meanwhile, so the sender's ops never dangle.
        why = self._receive(t, go)
        ok = why is None and not t.status.done
        store_put(store, dkey, {"s": "done"} if ok else {"s": "rfail", "why": why or t.error})
        if ok:
            self._count("recv", t.nbytes, len(chunk_ranges(t.nbytes, int(go["chunk"]))))
            self._succeed(t)
        else:
            self._fail(t, why or "aborted")

    def _recv_pair(self, sender: str, gen: int) -> RecvPair | None:
        with self._pairs_lock:
            pair = self._recv_pairs.get(sender)
            if pair is None or pair.gen < gen:
                if pair is not None:
                    pair.break_(f"superseded by generation {gen}")
                pair = self._recv_pairs[sender] = RecvPair(gen)
            return pair if pair.gen == gen else None

    def _receive(self, t: Transfer, go: dict[str, Any]) -> str | None:
        """Post this transfer's recvs in its turn and wait for them; returns why it failed."""
        gen, seq, sender = int(go["gen"]), int(go["seq"]), t.scratch["sender"]
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
                store_put(self._store, f"kv/pair/{sender}/accept/{gen}", {})  # the sender may join now
                pair.group = new_group(self.backend, self.host, self.port, f"kv/pair/{sender}/g{gen}", 0,
                                       t.remaining(), self._gloo_device)
            self._advance(t, TransferStatus.TRANSFERRING)
            dst = byte_view(t.tensor)
            works = [pair.group.recv([dst[off:off + n]], 1, t.scratch["tag"])
                     for off, n in chunk_ranges(t.nbytes, int(go["chunk"])) if n]
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
            store_put(store, f"kv/pair/{sender}/broken/{pair.gen}", {"why": why})

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
            host, port, inst = str(t.peer["host"]), int(t.peer["port"]), str(t.peer["instance"])
            peer = f"{host}:{port}/{inst}"
            store = self._client(peer, host, port, t.remaining())
        except Exception as e:  # bad endpoint, peer unreachable
            self._fail(t, f"cannot reach the store of {t.peer.get('worker_id')}: {e}")
            return
        try:
            self._send_via(t, store, peer)
        except Exception:  # the peer's store went away: do not reuse this client
            with self._pairs_lock:
                if self._clients.get(peer) is store:
                    del self._clients[peer]
            raise  # _spawn fails the transfer with this error

    def _send_via(self, t: Transfer, store: dist.TCPStore, peer: str) -> None:
        """Steps 2-5 of the module doc for one send, over the peer's store ``store``."""
        me = _pair_key(self.worker_id, self.instance)
        dkey = f"kv/d/{t.transfer_id}"
        grace = min(t.deadline, t.deadline - t.timeout_s + self.expect_grace_s)
        reg = poll(lambda: store_read(store, f"kv/x/{t.transfer_id}"), t, grace)
        if reg is None:
            if not self._expire(t):
                self._fail(t, f"refused: {t.peer.get('worker_id')} does not expect {t.transfer_id!r}")
            return
        if reg["sender"] != me:  # not ours to call off: the expected sender may still come
            self._fail(t, f"refused: {t.transfer_id!r} is expected from {reg['sender']}, not {me}")
            return
        if int(reg["nbytes"]) != t.nbytes:  # a gloo op of the wrong size would abort the process
            why = f"size mismatch: sender has {t.nbytes} bytes, receiver expects {reg['nbytes']}"
            store_claim(store, dkey, {"s": "sabort", "why": why})
            self._fail(t, why)
            return
        with self._pairs_lock:
            pair = self._send_pairs.setdefault(peer, SendPair())
        while not pair.lock.acquire(timeout=_PAIR_LOCK_POLL_S):
            if self._expire(t) or t.status.done:
                store_claim(store, dkey, {"s": "sabort", "why": t.error})
                return
        try:
            works = self._commit_and_post(t, store, pair, me, int(reg["tag"]))
        finally:
            pair.lock.release()
        if works is None:
            return
        try:
            wait_works(self.backend, works, t.deadline)
        except Exception as e:
            self._break_send_pair(store, pair, me, f"{self.backend} send failed: {e}")
            self._fail(t, f"{self.backend} send failed: {e}")
            return
        self._count("send", t.nbytes, len(chunk_ranges(t.nbytes, self.chunk_bytes)))

        def final_ack() -> dict[str, Any] | None:  # "go" until the receiver writes done/rfail
            value = store_read(store, dkey)
            return None if value is None or value["s"] == "go" else value

        ack = poll(final_ack, t, t.deadline)
        if ack is None:
            self._expire(t)
            return
        store.delete_key(dkey)
        if ack["s"] == "done":
            self._succeed(t)
        else:
            self._fail(t, f"receiver failed: {ack.get('why')}")

    def _commit_and_post(self, t: Transfer, store: dist.TCPStore, pair: SendPair, me: str,
                         tag: int) -> list[Any] | None:
        """Under the pair lock: claim "go", build the group if needed, post the sends."""
        gen_key = f"kv/pair/{me}"
        if pair.gen is None or pair.broken is not None or store.check([f"{gen_key}/broken/{pair.gen}"]):
            pair.reset(int(store.add(f"{gen_key}/gen", 1)))
        if self._expire(t) or t.status.done:
            store_claim(store, f"kv/d/{t.transfer_id}", {"s": "sabort", "why": t.error})
            return None
        go: dict[str, Any] = {"s": "go", "gen": pair.gen, "seq": pair.seq, "chunk": self.chunk_bytes}
        proof = self._proof(t.transfer_id, t.nbytes)
        if proof is not None:
            go["proof"] = proof
        won, now = store_claim(store, f"kv/d/{t.transfer_id}", go)
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
                                       lambda: self._closed)
                if refusal is not None:
                    if refusal.get("s") == "rfail":  # the receiver did not join: a new generation next time
                        why = f"receiver failed: {refusal.get('why')}"
                        pair.broken = why
                        store.delete_key(f"kv/d/{t.transfer_id}")
                    else:  # timed out or closed: tell the receiver this generation is dead
                        why = str(refusal.get("why"))
                        self._break_send_pair(store, pair, me, why)
                    self._fail(t, why)
                    return None
                pair.group = new_group(self.backend, str(t.peer["host"]), int(t.peer["port"]), f"{gen_key}/g{pair.gen}",
                                       1, t.remaining(), self._gloo_device)
            self._advance(t, TransferStatus.TRANSFERRING)
            data = t.tensor if t.tensor.device == self.device else t.tensor.to(self.device)
            src = byte_view(data)
            t.scratch["src"] = src  # keep the (possibly moved) payload alive until the ops finish
            return [pair.group.send([src[off:off + n]], 0, tag) for off, n in chunk_ranges(t.nbytes, self.chunk_bytes)
                    if n]
        except Exception as e:
            self._break_send_pair(store, pair, me, f"{self.backend} send failed: {e}")
            self._fail(t, f"{self.backend} send failed: {e}")
            return None

    def _break_send_pair(self, store: dist.TCPStore, pair: SendPair, me: str, why: str) -> None:
        gen, group = pair.gen, pair.group
        pair.broken = why
        if group is not None and self.backend == "nccl":
            group.abort()
        try:
            store_put(store, f"kv/pair/{me}/broken/{gen}", {"why": why})
        except Exception:
            pass  # the receiver may be gone: then there is nobody to tell

    def _close_backend(self) -> None:
        with self._pairs_lock:
            for pair in self._recv_pairs.values():
                pair.break_("transport closed")
            self._recv_pairs.clear()
            self._send_pairs.clear()
            self._clients.clear()
        self._store = None  # type: ignore[assignment]  # the last reference: stops the server
