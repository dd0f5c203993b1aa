"""torch.distributed backend specifics: separate processes, pair groups, no global state."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kvtransfer.base import TransferStatus
from kvtransfer.faults import FaultInjector, TransferFaults
from kvtransfer.torch_dist import TorchDistTransport

from .helpers import assert_same_bytes, kv, needs_two_gpus, transfer, wait_done

pytestmark = pytest.mark.timeout(120)

SHAPES = [(30, 2, 64, 3, 64), (30, 2, 512, 3, 64), (5, 7)]


def _sender_process(endpoints: Any, results: Any) -> None:
    """Child process: a gloo sender that pushes SHAPES[i] seeded i to the parent."""
    tr = TorchDistTransport("child-sender", "gloo", chunk_bytes=1 << 20)
    try:
        endpoints.put(tr.endpoint())
        peer = endpoints.get(timeout=60)
        for i, shape in enumerate(SHAPES):
            tr.send(f"x{i}", kv(shape, seed=i), peer, 30.0)
        results.put([(wait_done(tr, f"x{i}", 60.0).name, tr.error(f"x{i}")) for i in range(len(SHAPES))])
    finally:
        tr.close()


def test_sender_in_another_process() -> None:
    ctx = mp.get_context("spawn")
    to_parent, to_child, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    # The child reads the receiver's endpoint from `to_child` and writes its own to `to_parent`.
    child = ctx.Process(target=_sender_process, args=(_Duplex(to_parent, to_child), results), daemon=True)
    child.start()
    rx = TorchDistTransport("parent-receiver", "gloo", chunk_bytes=1 << 20)
    try:
        sender_ep = to_parent.get(timeout=60)
        for i, shape in enumerate(SHAPES):
            rx.expect(f"x{i}", shape, torch.float32, sender_ep, 30.0)
        to_child.put(rx.endpoint())
        for i, shape in enumerate(SHAPES):
            assert wait_done(rx, f"x{i}", 60.0) == TransferStatus.SUCCESS, rx.error(f"x{i}")
            assert_same_bytes(rx.result(f"x{i}"), kv(shape, seed=i))
        assert results.get(timeout=60) == [("SUCCESS", None)] * len(SHAPES)
        assert rx.stats()["chunks_received"] > len(SHAPES)  # the 23.6 MB one came in chunks
    finally:
        rx.close()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


class _Duplex:
    """Two queues seen as one by the child: put() goes up, get() comes down."""

    def __init__(self, up: Any, down: Any) -> None:
        self.up, self.down = up, down

    def put(self, item: Any) -> None:
        self.up.put(item)

    def get(self, timeout: float) -> Any:
        try:
            return self.down.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("the parent never sent its endpoint") from None


def test_no_global_process_group_and_groups_are_cached() -> None:
    a, b = TorchDistTransport("a", chunk_bytes=4096), TorchDistTransport("b", chunk_bytes=4096)
    try:
        for i in range(3):
            x = kv((8, 1000), seed=i)
            assert_same_bytes(transfer(a, b, f"t{i}", x), x)
        assert not dist.is_initialized()  # no init_process_group, no default world
        (pair,) = a._send_pairs.values()
        assert pair.gen == 1 and pair.seq == 3 and pair.group is not None
        (rpair,) = b._recv_pairs.values()
        assert rpair.gen == 1 and rpair.next_seq == 3
        # b -> a is another pair (another direction), with its own group
        x = kv((3, 3), seed=9)
        assert_same_bytes(transfer(b, a, "back", x), x)
        assert len(b._send_pairs) == 1 and len(a._recv_pairs) == 1
    finally:
        a.close()
        b.close()


def test_broken_pair_is_rebuilt_as_a_new_generation() -> None:
    a, b = TorchDistTransport("a"), TorchDistTransport("b")
    try:
        x = kv((16, 16), seed=1)
        assert_same_bytes(transfer(a, b, "warm", x), x)  # gen 1 is up...
        a._faults = FaultInjector(TransferFaults(drop_first_n=1))  # ...then a drop inside it breaks it
        b.expect("lost", (16, 16), torch.float32, a.endpoint(), 1.0)
        a.send("lost", x, b.endpoint(), 1.0)
        assert wait_done(b, "lost") == wait_done(a, "lost") == TransferStatus.FAILED
        assert_same_bytes(transfer(a, b, "after", x), x)
        (pair,) = a._send_pairs.values()
        assert pair.gen == 2 and pair.broken is None
    finally:
        a.close()
        b.close()


def test_receiver_restart_is_a_new_peer_and_dead_receiver_fails_fast() -> None:
    a, b = TorchDistTransport("a"), TorchDistTransport("b")
    old = b.endpoint()
    try:
        x = kv((4, 4), seed=2)
        assert_same_bytes(transfer(a, b, "one", x), x)
        b.close()
        a.send("to-dead", x, old, 5.0)
        assert wait_done(a, "to-dead", 10.0) == TransferStatus.FAILED
        b = TorchDistTransport("b")  # same worker id, new instance and port
        assert b.endpoint().instance != old.instance
        assert_same_bytes(transfer(a, b, "two", x), x)
    finally:
        a.close()
        b.close()


def test_store_port_is_published_and_released() -> None:
    a, b = TorchDistTransport("a"), TorchDistTransport("b")
    ports = {a.endpoint().port, b.endpoint().port}
    assert len(ports) == 2 and 0 not in ports
    a.close()
    b.close()
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free again


def test_nccl_needs_cuda() -> None:
    if torch.cuda.is_available() and dist.is_nccl_available():
        pytest.skip("this host has CUDA and NCCL")
    with pytest.raises(ValueError):
        TorchDistTransport("n", "nccl", device="cuda")


@needs_two_gpus
def test_nccl_sender_in_another_process_on_another_gpu() -> None:
    """The conformance suite covers nccl in one process; here the real shape: two processes."""
    ctx = mp.get_context("spawn")
    to_parent, to_child, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_nccl_sender_process, args=(_Duplex(to_parent, to_child), results), daemon=True)
    child.start()
    rx = TorchDistTransport("nccl-rx", "nccl", device="cuda:0", chunk_bytes=1 << 20)
    try:
        sender_ep = to_parent.get(timeout=120)
        rx.expect("n0", SHAPES[1], torch.float32, sender_ep, 60.0)
        to_child.put(rx.endpoint())
        assert wait_done(rx, "n0", 90.0) == TransferStatus.SUCCESS, rx.error("n0")
        got = rx.result("n0")
        assert got.device.type == "cuda"
        assert_same_bytes(got.cpu(), kv(SHAPES[1], seed=1))
        assert results.get(timeout=60) == ("SUCCESS", None)
    finally:
        rx.close()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def _nccl_sender_process(endpoints: Any, results: Any) -> None:
    tr = TorchDistTransport("nccl-tx", "nccl", device="cuda:1", chunk_bytes=1 << 20)
    try:
        endpoints.put(tr.endpoint())
        peer = endpoints.get(timeout=120)
        tr.send("n0", kv(SHAPES[1], seed=1).to("cuda:1"), peer, 60.0)
        results.put((wait_done(tr, "n0", 90.0).name, tr.error("n0")))
    finally:
        tr.close()
