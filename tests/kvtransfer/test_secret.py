"""The cluster secret on the KV plane, for every CPU backend (inproc, gloo, grpc, ray, shm).

A receiver with a secret accepts a transfer only from a sender that proves
the same secret: a wrong or missing proof fails that transfer on both sides
with "peer did not present the cluster secret", writes no byte, and the
receiver goes on accepting good senders. A receiver without a secret
accepts anyone (the behaviour before secrets).
"""

from __future__ import annotations

import itertools
import pickle
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from kvtransfer.base import KVTransport, TransferStatus
from kvtransfer.push_proof import SECRET_REFUSED, transfer_proof
from kvtransfer.grpc_transport import GrpcTransport
from kvtransfer.inproc import InProcHub, InProcTransport
from kvtransfer.shm_transport import ShmTransport
from kvtransfer.torch_dist import TorchDistTransport

from .helpers import assert_same_bytes, kv, transfer, wait_done

pytestmark = pytest.mark.timeout(180)

SECRET = "cluster-secret-5f3a9c"
REFUSAL_WITHIN_S = 8.0  # far below the transfers' own 30 s timeout: a refusal, not a timeout

MakeSide = Callable[[str | None], KVTransport]


class Sides:
    """Builds receivers and senders of one backend with a given secret; closes them all."""

    def __init__(self, backend: str, request: pytest.FixtureRequest) -> None:
        self.backend = backend
        self.hub = InProcHub()
        self.ids = itertools.count()
        self.created: list[KVTransport] = []
        self.hosts: list[Any] = request.getfixturevalue("ray_hosts") if backend == "ray" else []
        self.next_host = 0

    def _local(self, wid: str, secret: str | None) -> KVTransport:
        if self.backend == "inproc":
            return InProcTransport(self.hub, wid, chunk_bytes=1 << 16, secret=secret)
        if self.backend == "gloo":
            return TorchDistTransport(wid, "gloo", chunk_bytes=1 << 16, expect_grace_s=0.5, secret=secret)
        if self.backend == "grpc":
            return GrpcTransport(wid, chunk_bytes=1 << 16, secret=secret)
        if self.backend == "shm":
            return ShmTransport(wid, chunk_bytes=1 << 16, secret=secret)
        from kvtransfer.ray_transport import RayTransport

        return RayTransport(wid, secret=secret)  # a driver-side sender: it needs no actor

    def receiver(self, secret: str | None) -> KVTransport:
        wid = f"{self.backend}-rx{next(self.ids)}"
        if self.backend != "ray":
            tr = self._local(wid, secret)
        else:  # a Ray receiver must live in a named actor
            import ray

            from tests.kvtransfer.ray_hosts import CALL_TIMEOUT_S, ActorTransport

            host = self.hosts[self.next_host]
            self.next_host += 1
            tr = ActorTransport(host, ray.get(host.open.remote("ray", wid, {"secret": secret}), timeout=CALL_TIMEOUT_S))
        self.created.append(tr)
        return tr

    def sender(self, secret: str | None) -> KVTransport:
        tr = self._local(f"{self.backend}-tx{next(self.ids)}", secret)
        self.created.append(tr)
        return tr

    def close(self) -> None:
        for tr in self.created:
            tr.close()


@pytest.fixture(params=["inproc", "gloo", "grpc", "ray", "shm"])
def sides(request: pytest.FixtureRequest) -> Iterator[Sides]:
    s = Sides(request.param, request)
    yield s
    s.close()


def refused(src: KVTransport, dst: KVTransport, tid: str, x: torch.Tensor) -> tuple[str, str]:
    """Expect ``tid`` from ``src``, let it send, and return both sides' errors (both must be FAILED)."""
    dst.expect(tid, tuple(x.shape), x.dtype, src.endpoint(), 30.0)
    src.send(tid, x, dst.endpoint(), 30.0)
    assert wait_done(src, tid, REFUSAL_WITHIN_S) == TransferStatus.FAILED, src.error(tid)
    assert wait_done(dst, tid, REFUSAL_WITHIN_S) == TransferStatus.FAILED, dst.error(tid)
    errors = src.error(tid) or "", dst.error(tid) or ""
    src.forget(tid)
    dst.forget(tid)
    return errors


def test_matching_secret_moves_the_bytes(sides: Sides) -> None:
    rx, tx = sides.receiver(SECRET), sides.sender(SECRET)
    for i in range(2):  # the second one reuses gloo's pair group
        x = kv((30, 2, 16, 3, 64), seed=40 + i)
        assert_same_bytes(transfer(tx, rx, f"ok{i}", x).cpu(), x)
    assert rx.stats()["refused_unauthenticated"] == 0  # type: ignore[attr-defined]
    for ep in (rx.endpoint(), tx.endpoint()):  # what travels to peers (pickled by Ray) never holds the secret
        assert SECRET not in repr(ep) and SECRET.encode() not in pickle.dumps(ep)


@pytest.mark.parametrize("bad_secret", ["another-secret", None], ids=["wrong", "missing"])
def test_wrong_or_missing_secret_is_refused_and_the_receiver_stays_healthy(sides: Sides, bad_secret: str | None,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    rx, bad, good = sides.receiver(SECRET), sides.sender(bad_secret), sides.sender(SECRET)
    x = kv((30, 2, 16, 3, 64), seed=50)
    with caplog.at_level(logging.DEBUG):
        sent_err, recv_err = refused(bad, rx, "intruder", x)
    assert SECRET_REFUSED in sent_err and SECRET_REFUSED in recv_err
    stats = rx.stats()  # type: ignore[attr-defined]
    assert stats["bytes_received"] == 0 and stats["chunks_received"] == 0  # no byte was written
    assert stats["refused_unauthenticated"] == 1
    assert SECRET not in caplog.text and SECRET not in sent_err + recv_err
    if bad_secret is not None:
        assert bad_secret not in caplog.text and bad_secret not in sent_err + recv_err
    # The receiver goes on: a good sender gets through, and the bad one is refused again.
    assert_same_bytes(transfer(good, rx, "after", x).cpu(), x)
    sent_err, recv_err = refused(bad, rx, "intruder-again", x)
    assert SECRET_REFUSED in sent_err and SECRET_REFUSED in recv_err
    assert_same_bytes(transfer(good, rx, "after-again", x).cpu(), x)
    assert rx.stats()["refused_unauthenticated"] == 2  # type: ignore[attr-defined]


def test_receiver_without_a_secret_accepts_any_sender(sides: Sides) -> None:
    rx = sides.receiver(None)
    for i, secret in enumerate((SECRET, None)):
        x = kv((4, 33), seed=60 + i)
        assert_same_bytes(transfer(sides.sender(secret), rx, f"open{i}", x).cpu(), x)


def test_refusal_comes_before_any_other_check(sides: Sides) -> None:
    if sides.backend == "gloo":
        pytest.skip("gloo senders read the receiver's registrations from its (unauthenticated) store first")
    rx, bad = sides.receiver(SECRET), sides.sender(None)
    bad.send("nobody-expects-this", kv((2, 2)), rx.endpoint(), 30.0)
    assert wait_done(bad, "nobody-expects-this", REFUSAL_WITHIN_S) == TransferStatus.FAILED
    err = bad.error("nobody-expects-this") or ""
    assert SECRET_REFUSED in err and "not expected" not in err  # says nothing about which ids exist


def test_transfer_proof_binds_every_field() -> None:
    base = transfer_proof(b"k", "t1", "w1", 10)
    assert base == transfer_proof(b"k", "t1", "w1", 10) and len(base) == 64
    others = {transfer_proof(b"k2", "t1", "w1", 10), transfer_proof(b"k", "t2", "w1", 10),
              transfer_proof(b"k", "t1", "w2", 10), transfer_proof(b"k", "t1", "w1", 11),
              transfer_proof(b"k", "t1w", "1", 10)}
    assert base not in others and len(others) == 5
    with pytest.raises(ValueError, match="secret"):
        InProcTransport(InProcHub(), "w", secret="")
