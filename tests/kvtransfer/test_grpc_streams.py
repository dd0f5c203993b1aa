"""gRPC server admission: idle and unauthenticated streams cannot starve real transfers.

A real server on 127.0.0.1 and raw client streams that open and then send
nothing: unauthenticated ones end at once with UNAUTHENTICATED (before any
chunk is read), authenticated ones are closed after ``stream_idle_s``, one
sender holds at most ``max_streams_per_peer`` streams, and a real transfer
goes through promptly the whole time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from kvtransfer.base import TransferStatus
from kvtransfer.endpoints import Endpoint
from kvtransfer.push_proof import SECRET_REFUSED, transfer_proof
from kvtransfer.grpc_transport import GrpcTransport
from protos import kvtransfer_pb2, kvtransfer_pb2_grpc

from .helpers import assert_same_bytes, kv, transfer

pytestmark = pytest.mark.timeout(60)

SECRET = "grpc-secret-07d1"
N_IDLE = 24  # more than the 16 handler threads the server had before


class IdleStreams:
    """Raw ``Push`` streams to one server that send nothing until released."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = kvtransfer_pb2_grpc.KvTransferStub(self.channel)
        self.release = threading.Event()
        self.calls: list[grpc.Future] = []

    def _nothing(self) -> Iterator[kvtransfer_pb2.KvChunk]:
        self.release.wait(30.0)
        return
        yield  # a generator that yields nothing

    def open(self, metadata: tuple[tuple[str, str | bytes], ...]) -> grpc.Future:
        call = self.stub.Push.future(self._nothing(), timeout=30.0, metadata=metadata)
        self.calls.append(call)
        return call

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        self.channel.close()


def md(sender: str, transfer_id: str, total: int, proof: str | None = None) -> tuple[tuple[str, str | bytes], ...]:
    base: tuple[tuple[str, str | bytes], ...] = (("kv-sender", sender), ("kv-transfer-id-bin", transfer_id.encode()),
                                                 ("kv-total-bytes", str(total)))
    return base + ((("kv-proof", proof),) if proof is not None else ())


def code_within(call: grpc.Future, seconds: float) -> grpc.StatusCode | None:
    """The status code the call ended with, or None if it is still open after ``seconds``."""
    try:
        call.result(timeout=seconds)
        return grpc.StatusCode.OK
    except grpc.FutureTimeoutError:
        return None
    except grpc.RpcError as e:
        return e.code()


@pytest.mark.parametrize("secret", [SECRET, None])
def test_idle_unauthenticated_streams_do_not_block_a_real_transfer(secret: str | None) -> None:
    rx = GrpcTransport("rx", chunk_bytes=1 << 16, secret=secret)
    tx = GrpcTransport("tx", chunk_bytes=1 << 16, secret=secret)
    idle = IdleStreams(rx.port)
    try:
        for i in range(N_IDLE):  # no proof, an id nobody expects, no metadata at all
            idle.open(md("intruder", f"guess-{i}", 16) if i % 2 else ())
        time.sleep(0.5)  # let them all arrive first
        x = kv((64, 64), seed=11)
        t0 = time.monotonic()
        assert_same_bytes(transfer(tx, rx, "real", x, timeout_s=10.0), x)
        assert time.monotonic() - t0 < 5.0
        for i, call in enumerate(idle.calls):
            if not i % 2:
                assert code_within(call, 5.0) == grpc.StatusCode.INVALID_ARGUMENT
            elif secret is not None:
                assert code_within(call, 5.0) == grpc.StatusCode.UNAUTHENTICATED
                assert SECRET_REFUSED in call.exception().details()
            else:  # refused before a chunk is read: nobody expects that transfer
                assert call.result(timeout=5.0).ok is False
    finally:
        idle.close()
        tx.close()
        rx.close()


def test_idle_authenticated_stream_is_closed_after_the_bound() -> None:
    rx = GrpcTransport("rx", secret=SECRET, stream_idle_s=0.5)
    idle = IdleStreams(rx.port)
    try:
        rx.expect("t", (4,), torch.float32, Endpoint(worker_id="tx", backend="grpc"), 30.0)
        call = idle.open(md("tx", "t", 16, transfer_proof(SECRET.encode(), "t", "tx", 16)))
        assert code_within(call, 0.2) is None  # authenticated: it may wait a little
        assert code_within(call, 5.0) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing" in call.exception().details()
        assert rx.poll("t") == TransferStatus.FAILED and "sent nothing" in (rx.error("t") or "")
    finally:
        idle.close()
        rx.close()


def test_streams_per_peer_are_bounded() -> None:
    rx = GrpcTransport("rx", secret=SECRET, stream_idle_s=3.0, max_streams_per_peer=2)
    tx = GrpcTransport("other", secret=SECRET)
    idle = IdleStreams(rx.port)
    try:
        calls = []
        for i in range(3):
            rx.expect(f"t{i}", (4,), torch.float32, Endpoint(worker_id="tx", backend="grpc"), 30.0)
            calls.append(idle.open(md("tx", f"t{i}", 16, transfer_proof(SECRET.encode(), f"t{i}", "tx", 16))))
            time.sleep(0.2)  # in order
        assert code_within(calls[2], 2.0) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_within(calls[0], 0.1) is None and code_within(calls[1], 0.1) is None
        x = kv((8, 8), seed=12)  # another sender is not held back by tx's streams
        assert_same_bytes(transfer(tx, rx, "from-other", x, timeout_s=10.0), x)
    finally:
        idle.close()
        tx.close()
        rx.close()


def test_idle_bound_is_validated() -> None:
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="stream_idle_s"):
            GrpcTransport("x", stream_idle_s=bad)
