"""What the shared-memory backend adds to the conformance suite: which pairs take it,
buffer reuse, and that no buffer outlives a failed transfer, an expired lease,
an abort, or a peer that dies (a real process, killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from kvtransfer import make_transport
from kvtransfer.base import KVTransport, TransferStatus
from kvtransfer.endpoints import Endpoint, GrpcEndpoint, NodeLocalEndpoint, ShmEndpoint
from kvtransfer.grpc_transport import GrpcTransport
from kvtransfer.node_local import NodeLocalTransport
from kvtransfer.shm_buffers import MEMFD_NAME, buffer_size, host_key
from kvtransfer.shm_transport import ShmTransport

from .helpers import assert_same_bytes, kv, shm_leftovers, transfer, wait_done

pytestmark = pytest.mark.timeout(120)

X = kv((30, 2, 64, 3, 64), seed=70)  # the KV of 64 SmolLM2 tokens, 2.9 MB


@pytest.fixture
def opened() -> Iterator[list[KVTransport]]:
    """Transports a test opens; closed after it, and then no buffer of ours may be left in this process."""
    created: list[KVTransport] = []
    yield created
    for tr in created:
        tr.close()
    created.clear()
    assert shm_leftovers() == []


def node_local(opened: list[KVTransport], wid: str, node: str) -> NodeLocalTransport:
    tr = make_transport("grpc", wid, same_node="shm", node_id=node, chunk_bytes=1 << 20)
    assert isinstance(tr, NodeLocalTransport)
    opened.append(tr)
    return tr


def moved(tr: NodeLocalTransport) -> dict[str, int]:
    return {"shm": tr.local.stats()["bytes_received"], "grpc": tr.remote.stats()["bytes_received"]}


# ------------------------------------------------------------------ selection
def test_same_node_pairs_take_shared_memory_and_the_others_the_backend(opened: list[KVTransport]) -> None:
    a, b, c = node_local(opened, "a", "node-1"), node_local(opened, "b", "node-1"), node_local(opened, "c", "node-2")
    ep = a.endpoint()
    assert isinstance(ep, NodeLocalEndpoint) and isinstance(ep.remote, GrpcEndpoint) and isinstance(ep.shm, ShmEndpoint)
    assert (ep.worker_id, ep.backend, ep.node, ep.shm.worker_id) == ("a", "grpc", "node-1", "a")
    assert (a.path_for(b.endpoint()), a.path_for(c.endpoint()), c.path_for(a.endpoint())) == ("shm", "grpc", "grpc")
    assert_same_bytes(transfer(a, b, "same-node", X), X)
    assert_same_bytes(transfer(a, c, "other-node", X), X)
    assert_same_bytes(transfer(c, b, "other-node-back", X), X)
    assert moved(b) == {"shm": X.nbytes, "grpc": X.nbytes}  # one transfer in each way
    assert moved(c) == {"shm": 0, "grpc": X.nbytes}
    # Same node id on another kernel or network namespace: no shared memory there, so the backend.
    elsewhere = replace(b.endpoint(), shm=replace(b.endpoint().shm, host_key="another-boot/net:[1]"))
    assert a.path_for(elsewhere) == "grpc"
    # A peer without the shm half (same_node: backend) is reached through the backend.
    plain = make_transport("grpc", "plain", same_node="backend", node_id="node-1")
    opened.append(plain)
    assert isinstance(plain, GrpcTransport) and a.path_for(plain.endpoint()) == "grpc"
    assert_same_bytes(transfer(a, plain, "to-plain", X), X)
    assert a.stats()["bytes_sent"] == 3 * X.nbytes  # the counters of both halves, added up


def test_same_node_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="same_node"):
        make_transport("grpc", "w", same_node="sometimes")


# --------------------------------------------------------------------- buffers
def test_buffers_are_reused_and_mapped_once(opened: list[KVTransport]) -> None:
    tx, rx = ShmTransport("tx"), ShmTransport("rx")
    opened += [tx, rx]
    for i in range(3):
        assert_same_bytes(transfer(tx, rx, f"r{i}", kv((30, 2, 60 + i, 3, 64), seed=i)), kv((30, 2, 60 + i, 3, 64), seed=i))
    pool = rx.pool_stats()
    assert pool["created"] == 1 and pool["pooled"] == 1 and pool["free"] == 1 and pool["lent"] == 0
    assert tx.pool_stats()["mapped"] == 1  # the sender mapped the receiver's buffer once
    assert buffer_size(X.nbytes) >= X.nbytes and buffer_size(X.nbytes) <= X.nbytes * 1.125 + (64 << 10)


def test_a_held_result_keeps_its_buffer_and_the_next_transfer_gets_another(opened: list[KVTransport]) -> None:
    tx, rx = ShmTransport("tx"), ShmTransport("rx")
    opened += [tx, rx]
    first = transfer(tx, rx, "held", X)
    second = transfer(tx, rx, "next", X + 1)
    assert_same_bytes(first, X)  # not overwritten by the next transfer
    assert_same_bytes(second, X + 1)
    assert rx.pool_stats()["lent"] == 2
    del first, second
    assert rx.pool_stats()["lent"] == 0 and rx.pool_stats()["free"] == 2


def test_pool_bound_gives_one_off_buffers(opened: list[KVTransport]) -> None:
    tx, rx = ShmTransport("tx"), ShmTransport("rx", pool_bytes=0)
    opened += [tx, rx]
    for i in range(2):
        assert_same_bytes(transfer(tx, rx, f"o{i}", X), X)
    assert rx.pool_stats()["pooled"] == 0 and rx.pool_stats()["created"] == 2
    assert tx.pool_stats()["peer_mappings"] == 0  # one-off buffers are not kept mapped


# ------------------------------------------------------------ what gets freed
def test_expired_lease_returns_the_buffer(opened: list[KVTransport]) -> None:
    tx, rx = ShmTransport("tx"), ShmTransport("rx")
    opened += [tx, rx]
    rx.expect("late", tuple(X.shape), X.dtype, tx.endpoint(), 0.3)
    assert rx.pool_stats()["lent"] == 1
    assert wait_done(rx, "late") == TransferStatus.FAILED and "timed out" in (rx.error("late") or "")
    assert rx.pool_stats()["lent"] == 0 and rx.pool_stats()["free"] == 1  # never granted: reusable
    tx.send("late", X, rx.endpoint(), 5.0)  # the sender comes too late: refused, nothing granted
    assert wait_done(tx, "late", 5.0) == TransferStatus.FAILED
    assert tx.pool_stats()["mapped"] == 0


def test_abort_during_the_copy_retires_the_buffer(opened: list[KVTransport]) -> None:
    tx, rx = ShmTransport("tx", chunk_bytes=64), ShmTransport("rx")
    opened += [tx, rx]
    big = kv((16, 1 << 20), seed=71)  # 64 MiB in 64-byte copies: many seconds, unless the abort stops it
    rx.expect("cut", tuple(big.shape), big.dtype, tx.endpoint(), 30.0)
    tx.send("cut", big, rx.endpoint(), 30.0)
    deadline = time.monotonic() + 20
    # Both sides: the receiver marks TRANSFERRING before its grant reaches the sender, and an abort in that gap
    # ends the push before any copy (a different failure, "connection closed", not the one this test is about).
    while not rx.poll("cut") == tx.poll("cut") == TransferStatus.TRANSFERRING:
        assert time.monotonic() < deadline, (rx.poll("cut"), tx.poll("cut"))
        time.sleep(0.0005)
    rx.abort("cut")
    t_abort = time.monotonic()
    assert wait_done(tx, "cut", 5.0) == TransferStatus.FAILED  # the sender stops copying at once
    assert time.monotonic() - t_abort < 3.0 and "ended the transfer" in (tx.error("cut") or "")
    assert rx.poll("cut") == TransferStatus.FAILED
    assert rx.pool_stats()["pooled"] == 0 and rx.pool_stats()["lent"] == 0  # retired, not reused
    rx.forget("cut")
    tx.forget("cut")
    assert_same_bytes(transfer(tx, rx, "after", X), X)  # a new buffer for the next one


# ---------------------------------------------------------- a peer that dies
_FAKE_SENDER = textwrap.dedent("""
    import json, socket, struct, sys, time
    address, nbytes = sys.argv[1], int(sys.argv[2])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\\0" + address)
    msg = json.dumps({"op": "push", "transfer_id": "dies", "sender": "tx", "nbytes": nbytes, "proof": None}).encode()
    s.sendall(struct.pack(">I", len(msg)) + msg)
    data, fds, _, _ = socket.recv_fds(s, 65536, 1)
    print("granted" if fds else "refused", flush=True)
    time.sleep(600)  # as if stuck in the copy: killed here
""")

_FAKE_RECEIVER = textwrap.dedent("""
    import json, mmap, os, socket, struct, sys, time
    nbytes = int(sys.argv[1])
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind("\\0splitserve-kv/test-fake-receiver-%d" % os.getpid())
    ls.listen()
    print(json.dumps({"socket": "splitserve-kv/test-fake-receiver-%d" % os.getpid(), "pid": os.getpid()}), flush=True)
    conn, _ = ls.accept()
    n = struct.unpack(">I", conn.recv(4))[0]
    conn.recv(n)
    fd = os.memfd_create(sys.argv[2])
    os.ftruncate(fd, nbytes)
    grant = json.dumps({"ok": True, "token": "t", "size": nbytes, "live": ["t"]}).encode()
    socket.send_fds(conn, [struct.pack(">I", len(grant)) + grant], [fd])
    print("granted", flush=True)
    time.sleep(600)  # never acknowledges: killed here
""")


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


def test_receiver_frees_the_buffer_of_a_sender_that_dies(opened: list[KVTransport]) -> None:
    rx = ShmTransport("rx")
    opened.append(rx)
    rx.expect("dies", tuple(X.shape), X.dtype, Endpoint(worker_id="tx", backend="shm"), 30.0)
    child = _child(_FAKE_SENDER, rx.endpoint().socket, str(X.nbytes))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "granted"
        assert rx.poll("dies") == TransferStatus.TRANSFERRING
        os.kill(child.pid, signal.SIGKILL)
        assert wait_done(rx, "dies", 5.0) == TransferStatus.FAILED  # at once, not after 30 s
        assert "sender went away" in (rx.error("dies") or "")
    finally:
        child.kill()
        child.wait(10)
    assert rx.pool_stats()["pooled"] == 0 and rx.pool_stats()["lent"] == 0  # retired and closed


def test_sender_fails_and_unmaps_when_the_receiver_dies(opened: list[KVTransport]) -> None:
    tx = ShmTransport("tx")
    opened.append(tx)
    child = _child(_FAKE_RECEIVER, str(X.nbytes), MEMFD_NAME)
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        peer = ShmEndpoint(worker_id="rx", node=None, host_key=host_key(), socket=info["socket"], instance="fake",
                           pid=info["pid"])
        tx.send("dies", X, peer, 30.0)
        assert child.stdout.readline().strip() == "granted"
        deadline = time.monotonic() + 10
        while tx.pool_stats()["mapped"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert wait_done(tx, "dies", 5.0) == TransferStatus.FAILED  # at once, not after 30 s
    finally:
        child.kill()
        child.wait(10)
    assert tx.pool_stats()["peer_mappings"] == 1  # the dead receiver's buffer, still mapped here...
    tx.send("next", X, peer, 1.0)  # ...until the next send looks for dead peers (and fails: nobody listens)
    assert wait_done(tx, "next", 5.0) == TransferStatus.FAILED
    assert tx.pool_stats()["peer_mappings"] == 0
    assert shm_leftovers() == []
