"""The gloo/NCCL control store: where it listens, what it trusts, how big it grows.

- The ``TCPStore`` listens on the transport's ``host`` only, not on every interface.
- With a cluster secret, a store record altered by someone without it
  (here: the chunk size of a committed "go", the one field that would make
  gloo abort the receiver's process on a size mismatch) is refused with a
  clear error on both sides; the receiver's process lives on and the pair
  recovers for the next transfer.
- Records of finished and aborted transfers are deleted: the store's key
  count stays bounded over many transfers and aborts.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import threading
import time
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist

from kvtransfer.base import TransferStatus
from kvtransfer.torch_dist import TorchDistTransport

from .helpers import assert_same_bytes, kv, transfer, wait_done

pytestmark = pytest.mark.timeout(120)

SECRET = "store-secret-81c2"


def _listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def _other_address() -> str | None:
    """An address of this machine that is not loopback (None if it has none)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_store_listens_on_the_configured_host_only() -> None:
    tr = TorchDistTransport("a", host="127.0.0.1")
    try:
        port = tr.endpoint().port
        assert _listening_addresses(port) == {"127.0.0.1"}
        other = _other_address()
        if other is not None:  # not reachable through another interface
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2.0)
                s.connect((other, port))
        x = kv((8, 8), seed=3)
        rx = TorchDistTransport("b", host="127.0.0.1")
        try:
            assert_same_bytes(transfer(tr, rx, "t", x), x)
        finally:
            rx.close()
    finally:
        tr.close()


def _tamper_scenario(results: Any) -> None:
    """Child process: a forged chunk size in a committed "go" record, written by someone without the secret.

    The receiver's reads of its "go" record are held back until the attacker
    has rewritten it, so the scenario is deterministic. Before the fix the
    receiver posted recvs of the forged size against the sender's real sends,
    and gloo aborted the whole process.
    """
    import kvtransfer.torch_dist as td

    release = threading.Event()
    real_poll = td.poll

    def held_poll(fn: Any, t: Any, until: float) -> Any:
        if t.role == "recv" and t.transfer_id == "victim":
            release.wait(20.0)
        return real_poll(fn, t, until)

    td.poll = held_poll
    a = td.TorchDistTransport("a", chunk_bytes=1 << 20, expect_grace_s=0.5, secret=SECRET)
    b = td.TorchDistTransport("b", chunk_bytes=1 << 20, expect_grace_s=0.5, secret=SECRET)
    out: dict[str, Any] = {}
    try:
        x = kv((64, 64), seed=5)  # 16 KiB: one chunk
        transfer(a, b, "warm", x)  # the pair group is up: the next "go" posts sends at once
        b.expect("victim", tuple(x.shape), x.dtype, a.endpoint(), 10.0)
        a.send("victim", x, b.endpoint(), 10.0)
        attacker = dist.TCPStore("127.0.0.1", b.endpoint().port, None, False, wait_for_workers=False)
        deadline = time.monotonic() + 10.0
        while not attacker.check(["kv/d/victim"]) and time.monotonic() < deadline:
            time.sleep(0.001)
        record = json.loads(attacker.get("kv/d/victim"))
        out["committed"] = record.get("s")
        record["chunk"] = 7  # recvs of 7 bytes against one send of 16 KiB
        attacker.set("kv/d/victim", json.dumps(record, sort_keys=True))
        t0 = time.monotonic()
        release.set()
        out["rx"] = (wait_done(b, "victim", 15.0).name, b.error("victim"))
        out["tx"] = (wait_done(a, "victim", 15.0).name, a.error("victim"))
        out["refused_within_s"] = time.monotonic() - t0
        y = kv((64, 64), seed=6)
        out["after_ok"] = bool(torch.equal(transfer(a, b, "after", y), y))
    finally:
        a.close()
        b.close()
    results.put(out)


def test_altered_go_record_is_refused_and_the_receiver_lives_on() -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_tamper_scenario, args=(results,))
    proc.start()
    proc.join(90)
    assert proc.exitcode == 0, f"the receiver's process died (exit code {proc.exitcode})"
    out = results.get(timeout=5)
    assert out["committed"] == "go"
    rx_status, rx_error = out["rx"]
    assert rx_status == "FAILED" and "unsealed or altered" in rx_error, rx_error
    assert out["tx"][0] == "FAILED", out["tx"]  # the receiver refused and dropped the pair group its sends were on
    assert out["refused_within_s"] < 5.0  # a refusal, not the 10 s timeout
    assert out["after_ok"]


def test_unsealed_go_with_a_captured_proof_is_refused() -> None:
    """A "go" that carries a valid proof for its transfer, but steering fields its sender did not seal."""
    from kvtransfer.push_proof import transfer_proof

    a = TorchDistTransport("a", expect_grace_s=0.5, secret=SECRET)
    b = TorchDistTransport("b", expect_grace_s=0.5, secret=SECRET)
    try:
        b.expect("t", (4,), torch.float32, a.endpoint(), 10.0)
        sender = f"a/{a.endpoint().instance}"
        attacker = dist.TCPStore("127.0.0.1", b.endpoint().port, None, False, wait_for_workers=False)
        go = {"s": "go", "gen": 99, "seq": 0, "chunk": 1, "proof": transfer_proof(SECRET.encode(), "t", "a", 16)}
        assert attacker.compare_set("kv/d/t", "", json.dumps(go)) == json.dumps(go).encode()
        assert wait_done(b, "t", 5.0) == TransferStatus.FAILED
        assert "unsealed or altered" in (b.error("t") or "")
        assert sender not in b._recv_pairs or b._recv_pairs[sender].gen != 99  # no group of the forger's generation
        assert json.loads(attacker.get("kv/d/t"))["s"] == "rfail"
    finally:
        a.close()
        b.close()


def test_store_keys_stay_bounded_over_many_transfers_and_aborts() -> None:
    a = TorchDistTransport("a", expect_grace_s=0.2)
    b = TorchDistTransport("b", expect_grace_s=0.2)
    x = kv((8, 8), seed=7)
    timeout_s = 0.5
    try:
        transfer(a, b, "warm", x, timeout_s=10.0)
        for round_ in range(4):
            for i in range(10):
                tid = f"r{round_}-{i}"
                b.expect(tid, tuple(x.shape), x.dtype, a.endpoint(), timeout_s)
                if i % 3 == 0:
                    b.abort(tid)  # receiver gives up before any sender came
                elif i % 3 == 1:
                    a.send(tid, x, b.endpoint(), timeout_s)  # a normal transfer
                    wait_done(b, tid)
                    wait_done(a, tid)
                # else: nobody sends; the receiver times out
            for i in range(10):
                tid = f"r{round_}-{i}"
                assert wait_done(b, tid, 5.0).done
                b.forget(tid)
                a.forget(tid)
            time.sleep(timeout_s + 0.2 + 0.3)  # past every tombstone's lifetime
        transfer(a, b, "last", x, timeout_s=10.0)  # purges what is due
        assert b._store.num_keys() <= 4, b._store.num_keys()  # gen counter + the last transfer's records
    finally:
        a.close()
        b.close()
