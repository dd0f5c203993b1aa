"""The client library retries UNAVAILABLE on the next router address before the first token, never after.

The client is the component under test; the routers are small scripted
``Serving`` servers on 127.0.0.1 (real gRPC), one behaviour each.
"""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest

from cluster.local_ray import free_port
from protos import serving_pb2, serving_pb2_grpc
from router.client import AsyncClient, Client, RetryPolicy, parse_addresses

FAST = RetryPolicy(max_tries=4, initial_backoff_s=0.01, max_backoff_s=0.05)


class Scripted(serving_pb2_grpc.ServingServicer):
    """``mode``: "serve" streams two chunks; "unavailable" refuses; "die_mid" sends one chunk then UNAVAILABLE;
    "invalid" answers INVALID_ARGUMENT."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls = 0

    def Generate(self, request, context):
        self.calls += 1
        if self.mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        if self.mode == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: bad")
        yield serving_pb2.GenerateResponse(request_id=request.request_id, token_ids=[1], text="a")
        if self.mode == "die_mid":
            context.abort(grpc.StatusCode.UNAVAILABLE, "router going away")
        yield serving_pb2.GenerateResponse(request_id=request.request_id, token_ids=[2], text="b",
                                           finish_reason=serving_pb2.FINISH_REASON_LENGTH)


@pytest.fixture
def routers():
    servers, made = [], []

    def make(mode: str) -> tuple[str, Scripted]:
        servicer = Scripted(mode)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        serving_pb2_grpc.add_ServingServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        made.append(servicer)
        return f"127.0.0.1:{port}", servicer

    yield make
    for server in servers:
        server.stop(0)


def test_addresses_parse_from_a_comma_list_or_a_sequence():
    assert parse_addresses("a:1, b:2") == ["a:1", "b:2"]
    assert parse_addresses(["a:1"]) == ["a:1"]
    with pytest.raises(ValueError):
        parse_addresses(" , ")


def test_unavailable_and_unreachable_routers_are_skipped_before_the_first_token(routers):
    refusing, refuser = routers("unavailable")
    serving, server = routers("serve")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the channel fails with UNAVAILABLE
    client = Client([dead, refusing, serving], timeout_s=30, retry=FAST)
    try:
        out = client.generate("hi")
        assert out.token_ids == [1, 2] and out.finish_reason == "length"
        assert refuser.calls == 1 and server.calls == 1
    finally:
        client.close()


def test_after_the_first_token_the_error_goes_to_the_caller(routers):
    dying, dier = routers("die_mid")
    serving, server = routers("serve")
    client = Client([dying, serving], timeout_s=30, retry=FAST)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dier.calls == 1 and server.calls == 0  # never replayed: tokens would repeat
    finally:
        client.close()


def test_other_errors_are_not_retried_and_tries_are_bounded(routers):
    invalid, inv = routers("invalid")
    serving, server = routers("serve")
    client = Client([invalid, serving], timeout_s=30, retry=FAST)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and server.calls == 0
    finally:
        client.close()
    a, ra = routers("unavailable")
    b, rb = routers("unavailable")
    client = Client([a, b], timeout_s=30, retry=FAST)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ra.calls + rb.calls == FAST.max_tries
    finally:
        client.close()


def test_async_client_retries_the_same_way(routers):
    refusing, refuser = routers("unavailable")
    serving, server = routers("serve")
    dying, dier = routers("die_mid")

    async def go():
        client = AsyncClient(f"{refusing},{serving}", timeout_s=30, retry=FAST)
        try:
            out = await client.generate("hi")
        finally:
            await client.close()
        client = AsyncClient([dying, serving], timeout_s=30, retry=FAST)
        try:
            with pytest.raises(grpc.RpcError):
                await client.generate("hi")
        finally:
            await client.close()
        return out

    out = asyncio.run(go())
    assert out.token_ids == [1, 2] and refuser.calls == 1 and dier.calls == 1 and server.calls == 1


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.3)
    assert [policy.backoff_s(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
