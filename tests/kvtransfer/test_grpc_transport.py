"""gRPC backend specifics: what the server accepts on the wire, chunk limits, ports."""

from __future__ import annotations

import socket

import grpc
import pytest
import torch

from kvtransfer.base import TransferStatus
from kvtransfer.endpoints import Endpoint, GrpcEndpoint
from kvtransfer.grpc_transport import GrpcTransport
from protos import kvtransfer_pb2, kvtransfer_pb2_grpc

from .helpers import assert_same_bytes, kv, transfer, wait_done

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def rx():
    tr = GrpcTransport("rx", chunk_bytes=1 << 16)
    yield tr
    tr.close()


def stream_metadata(sender: str, transfer_id: str, total_bytes: int) -> tuple[tuple[str, str | bytes], ...]:
    return (("kv-sender", sender), ("kv-transfer-id-bin", transfer_id.encode()), ("kv-total-bytes", str(total_bytes)))


def push(rx: GrpcTransport, chunks: list[kvtransfer_pb2.KvChunk], sender: str = "tx") -> kvtransfer_pb2.PushAck:
    """A raw push whose metadata names the first chunk's transfer and size."""
    with grpc.insecure_channel(f"127.0.0.1:{rx.port}") as channel:
        stub = kvtransfer_pb2_grpc.KvTransferStub(channel)
        md = stream_metadata(sender, chunks[0].transfer_id, chunks[0].total_bytes)
        return stub.Push(iter(chunks), timeout=10, metadata=md)


def test_raw_push_of_raw_bytes(rx: GrpcTransport) -> None:
    x = kv((4, 8), seed=1)
    raw = x.numpy().tobytes()
    rx.expect("t", (4, 8), torch.float32, Endpoint(worker_id="tx", backend="grpc"), 10.0)
    ack = push(rx, [kvtransfer_pb2.KvChunk(transfer_id="t", offset=o, data=raw[o:o + 40], total_bytes=len(raw))
                    for o in range(0, len(raw), 40)])
    assert ack.ok, ack.error
    assert rx.poll("t") == TransferStatus.SUCCESS
    assert_same_bytes(rx.result("t"), x)


@pytest.mark.parametrize("case", ["unknown", "wrong-sender", "gap", "too-long", "short-stream", "wrong-total"])
def test_server_refuses_bad_streams(rx: GrpcTransport, case: str) -> None:
    rx.expect("t", (4,), torch.float32, Endpoint(worker_id="tx", backend="grpc"), 10.0)
    good = [kvtransfer_pb2.KvChunk(transfer_id="t", offset=0, data=bytes(8), total_bytes=16),
            kvtransfer_pb2.KvChunk(transfer_id="t", offset=8, data=bytes(8), total_bytes=16)]
    chunks, sender = list(good), "tx"
    if case == "unknown":
        chunks = [kvtransfer_pb2.KvChunk(transfer_id="other", offset=0, data=bytes(16), total_bytes=16)]
    elif case == "wrong-sender":
        sender = "intruder"
    elif case == "gap":
        chunks[1].offset = 12
    elif case == "too-long":
        chunks.append(kvtransfer_pb2.KvChunk(transfer_id="t", offset=16, data=bytes(4), total_bytes=16))
    elif case == "short-stream":
        chunks = chunks[:1]
    elif case == "wrong-total":
        chunks = [kvtransfer_pb2.KvChunk(transfer_id="t", offset=0, data=bytes(20), total_bytes=20)]
    ack = push(rx, chunks, sender)
    assert not ack.ok and ack.error
    # A refusal of someone else's push leaves the expected transfer alone; a broken one fails it.
    expect = TransferStatus.WAITING if case in ("unknown", "wrong-sender") else TransferStatus.FAILED
    assert rx.poll("t") == expect


def test_sender_chunks_fit_the_receivers_limit(rx: GrpcTransport) -> None:
    tx = GrpcTransport("tx", chunk_bytes=4 << 20)
    try:
        x = kv((256, 1024), seed=2)  # 1 MiB; the receiver takes 64 KiB chunks
        assert_same_bytes(transfer(tx, rx, "fit", x), x)
        assert rx.stats()["chunks_received"] == 16
    finally:
        tx.close()


def test_unreachable_peer_fails_by_the_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    tx = GrpcTransport("tx")
    try:
        tx.send("t", kv((4,)), GrpcEndpoint(worker_id="gone", host="127.0.0.1", port=dead_port, max_chunk_bytes=tx.chunk_bytes), 0.5)
        assert wait_done(tx, "t", 10.0) == TransferStatus.FAILED
    finally:
        tx.close()


def test_port_released_on_close() -> None:
    tr = GrpcTransport("x")
    port = tr.endpoint().port
    assert port
    tr.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
