"""One conformance suite, run against every backend (see conftest ``make``).

What every :class:`~kvtransfer.base.KVTransport` must do: move bytes
exactly (any dtype, in chunks), keep concurrent transfers apart, refuse what
it does not expect, fail on time (timeout, abort, faults) on both sides, and
keep its status machine and bookkeeping rules.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from kvtransfer.base import TransferError, TransferStatus
from kvtransfer.faults import TransferFaults

from .helpers import KV_SHAPE, MakeTransport, assert_same_bytes, kv, transfer, wait_done

pytestmark = pytest.mark.timeout(120)

# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_arrive_exactly(make: MakeTransport, dtype: torch.dtype) -> None:
    src, dst = make(), make()
    x = kv(dtype=dtype, seed=1)
    got = transfer(src, dst, "exact", x)
    assert_same_bytes(got.cpu(), x)
    with pytest.raises(KeyError):
        dst.poll("exact")  # result() forgot it


def test_odd_sizes_and_empty(make: MakeTransport) -> None:
    src, dst = make(chunk_bytes=1000), make(chunk_bytes=1000)
    for i, shape in enumerate([(1,), (3, 333), (0, 2, 4), (7, 1, 13, 1, 3)]):
        x = kv(shape, seed=i)
        assert_same_bytes(transfer(src, dst, f"odd{i}", x).cpu(), x)


def test_large_payload_moves_in_many_chunks(make: MakeTransport) -> None:
    src, dst = make(chunk_bytes=1 << 20), make(chunk_bytes=1 << 20)
    x = kv((16, 1 << 20), seed=2)  # 64 MiB of float32
    got = transfer(src, dst, "big", x, timeout_s=60.0)
    assert_same_bytes(got.cpu(), x)
    sent, received = src.stats(), dst.stats()  # type: ignore[attr-defined]
    assert sent["bytes_sent"] == received["bytes_received"] == x.numel() * 4
    if make.backend != "ray":  # type: ignore[attr-defined]  # one object, no chunks
        assert sent["chunks_sent"] == received["chunks_received"] == 64


# ----------------------------------------------------------------- concurrency
def test_concurrent_transfers_on_one_pair_do_not_mix(make: MakeTransport) -> None:
    src, dst = make(chunk_bytes=64 << 10), make(chunk_bytes=64 << 10)
    xs = {f"c{i}": kv((30, 2, 16 + 8 * i, 3, 64), seed=10 + i) for i in range(6)}
    for tid, x in xs.items():
        dst.expect(tid, tuple(x.shape), x.dtype, src.endpoint(), 30.0)
    order = list(xs)
    random.Random(3).shuffle(order)  # sent in another order than expected
    for tid in order:
        src.send(tid, xs[tid], dst.endpoint(), 30.0)
    for tid, x in xs.items():
        assert wait_done(dst, tid) == TransferStatus.SUCCESS, dst.error(tid)
        assert wait_done(src, tid) == TransferStatus.SUCCESS, src.error(tid)
        assert_same_bytes(dst.result(tid).cpu(), x)


def test_two_senders_to_one_receiver(make: MakeTransport) -> None:
    a, b, dst = make(chunk_bytes=64 << 10), make(chunk_bytes=64 << 10), make(chunk_bytes=64 << 10)
    xs = {(s, i): kv((30, 2, 24, 3, 64), seed=20 + 3 * k + i) for k, s in enumerate((a, b)) for i in range(3)}
    for (s, i), x in xs.items():
        dst.expect(f"{s.endpoint().worker_id}-{i}", tuple(x.shape), x.dtype, s.endpoint(), 30.0)
    for (s, i), x in xs.items():
        s.send(f"{s.endpoint().worker_id}-{i}", x, dst.endpoint(), 30.0)
    for (s, i), x in xs.items():
        tid = f"{s.endpoint().worker_id}-{i}"
        assert wait_done(dst, tid) == TransferStatus.SUCCESS, dst.error(tid)
        assert wait_done(s, tid) == TransferStatus.SUCCESS, s.error(tid)
        assert_same_bytes(dst.result(tid).cpu(), x)


# ---------------------------------------------------------- refusals, failures
def test_unknown_transfer_is_refused(make: MakeTransport) -> None:
    src, dst = make(), make()
    src.send("nobody-expects", kv((4, 4)), dst.endpoint(), 10.0)
    assert wait_done(src, "nobody-expects", 8.0) == TransferStatus.FAILED  # well before its own timeout
    assert "not expect" in (src.error("nobody-expects") or "") or "refused" in (src.error("nobody-expects") or "")
    with pytest.raises(KeyError):
        dst.poll("nobody-expects")


def test_wrong_sender_or_size_is_refused_on_both_sides(make: MakeTransport) -> None:
    a, b, dst = make(), make(), make()
    dst.expect("from-a", (4, 4), torch.float32, a.endpoint(), 5.0)
    b.send("from-a", kv((4, 4)), dst.endpoint(), 5.0)  # the wrong sender
    assert wait_done(b, "from-a", 8.0) == TransferStatus.FAILED
    dst.expect("sized", (4, 4), torch.float32, a.endpoint(), 5.0)
    a.send("sized", kv((4, 5)), dst.endpoint(), 5.0)  # the wrong size: must not crash anything
    assert wait_done(a, "sized", 8.0) == TransferStatus.FAILED
    assert wait_done(dst, "sized", 8.0) == TransferStatus.FAILED
    x = kv((4, 4), seed=5)  # the pair still works
    assert_same_bytes(transfer(a, dst, "after", x).cpu(), x)


def test_receiver_times_out_when_nothing_is_sent(make: MakeTransport) -> None:
    src, dst = make(), make()
    t0 = time.monotonic()
    dst.expect("never", KV_SHAPE, torch.float32, src.endpoint(), 1.0)
    assert dst.poll("never") in (TransferStatus.BOOTSTRAPPING, TransferStatus.WAITING)
    assert wait_done(dst, "never") == TransferStatus.FAILED
    assert 0.9 < time.monotonic() - t0 < 10.0
    assert "timed out" in (dst.error("never") or "")
    with pytest.raises(TransferError):
        dst.result("never")
    dst.forget("never")


def test_dropped_payload_times_out_both_sides_then_pair_recovers(make: MakeTransport) -> None:
    src, dst = make(faults=TransferFaults(drop_first_n=1)), make()
    x = kv(seed=6)
    dst.expect("lost", KV_SHAPE, torch.float32, src.endpoint(), 1.0)
    src.send("lost", x, dst.endpoint(), 1.0)
    assert wait_done(dst, "lost") == TransferStatus.FAILED
    assert wait_done(src, "lost") == TransferStatus.FAILED
    assert "timed out" in (src.error("lost") or "")
    assert_same_bytes(transfer(src, dst, "next", x).cpu(), x)  # the second send is not dropped


def test_fail_first_n_and_delay_faults(make: MakeTransport) -> None:
    src, dst = make(faults=TransferFaults(fail_first_n=1, delay_s=0.3)), make()
    x = kv((8, 8), seed=7)
    dst.expect("f1", (8, 8), torch.float32, src.endpoint(), 10.0)
    src.send("f1", x, dst.endpoint(), 10.0)
    assert wait_done(src, "f1") == TransferStatus.FAILED
    assert "injected" in (src.error("f1") or "")
    dst.abort("f1")
    t0 = time.monotonic()
    assert_same_bytes(transfer(src, dst, "f2", x).cpu(), x)
    assert time.monotonic() - t0 >= 0.3


def test_receiver_abort(make: MakeTransport) -> None:
    src, dst = make(), make()
    dst.expect("ra", KV_SHAPE, torch.float32, src.endpoint(), 10.0)
    dst.abort("ra")
    assert dst.poll("ra") == TransferStatus.FAILED and dst.error("ra") == "aborted"
    src.send("ra", kv(), dst.endpoint(), 10.0)
    assert wait_done(src, "ra", 8.0) == TransferStatus.FAILED  # refused, well before its timeout
    with pytest.raises(TransferError):
        dst.result("ra")


def test_sender_abort(make: MakeTransport) -> None:
    src, dst = make(faults=TransferFaults(delay_s=5.0)), make()
    dst.expect("sa", KV_SHAPE, torch.float32, src.endpoint(), 1.5)
    src.send("sa", kv(), dst.endpoint(), 10.0)
    src.abort("sa")
    assert src.poll("sa") == TransferStatus.FAILED and src.error("sa") == "aborted"
    assert wait_done(dst, "sa") == TransferStatus.FAILED  # nothing came: its deadline ends it


# ------------------------------------------------------------ bookkeeping rules
def test_status_rules_and_forget(make: MakeTransport) -> None:
    src, dst = make(), make()
    x = kv((2, 3), seed=8)
    dst.expect("r", (2, 3), torch.float32, src.endpoint(), 10.0)
    with pytest.raises(ValueError):
        dst.expect("r", (2, 3), torch.float32, src.endpoint(), 10.0)  # a live id is not reused
    with pytest.raises(RuntimeError):
        dst.result("r")  # not finished yet
    src.send("r", x, dst.endpoint(), 10.0)
    assert wait_done(src, "r") == TransferStatus.SUCCESS
    assert wait_done(dst, "r") == TransferStatus.SUCCESS
    src.abort("r")  # finished statuses are final
    assert src.poll("r") == TransferStatus.SUCCESS and src.error("r") is None
    with pytest.raises(ValueError):
        src.result("r")  # the sender has no result
    for _ in range(2):
        src.forget("r")
        src.forget("never-existed")
    with pytest.raises(KeyError):
        src.poll("r")
    src.abort("r")  # unknown: a no-op
    assert_same_bytes(dst.result("r").cpu(), x)
    with pytest.raises(KeyError):
        dst.result("r")
