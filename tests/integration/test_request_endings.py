"""Whatever way a request ends, both workers' KV blocks are free again within 1 s.

One live tiny cluster with the default 30 s lease (so a leaked reservation
would show for 30 s) and a prefill transport whose first two sends fail (so
the first request meets a worker error: its push fails twice and the attempt
is retried). Each ending runs in turn, and after each one every worker's free
blocks must be back at capacity within a second.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from benchmarks.deployments import make_config, running
from kvtransfer.faults import TransferFaults
from router.client import AsyncClient, Client
from tests.integration.clusters import block_usage, wait_until

FREE_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def cluster(ray_head):
    cfg = make_config(decode={"num_blocks": 256}, prefill={"num_blocks": 256})
    assert cfg.kvtransfer.lease_s >= 30  # a leak would outlive the checks below
    with running(cfg, faults=TransferFaults(fail_first_n=2)) as (d, address):
        yield d, address


def all_free(address: str) -> bool:
    return all(used == 0 for used, _ in block_usage(address).values())


def freed_within(address: str, ending: str) -> float:
    return wait_until(lambda: all_free(address), 10, f"every worker's blocks back at capacity after {ending}", 0.02)


def worker_error(address: str) -> None:
    client = Client(address, timeout_s=120)
    out = client.generate("the first push fails twice", max_tokens=6, ignore_eos=True)
    assert out.timings.attempts == 2 and len(out.token_ids) == 6


def first_token_finishes(address: str) -> None:
    client = Client(address, timeout_s=120)
    out = client.generate("just one token", max_tokens=1)
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


def stop_token_first(address: str) -> None:
    client = Client(address, timeout_s=120)
    first = client.generate("stop at once", max_tokens=1).token_ids[0]
    out = client.generate("stop at once", max_tokens=8, stop_token_ids=[first])
    assert list(out.token_ids) == [first] and out.finish_reason == "stop"


def many_first_token_finishes(address: str) -> None:
    client = Client(address, timeout_s=120)
    async def go():
        c = AsyncClient(address, timeout_s=120)
        try:
            return await asyncio.gather(*(c.generate(prompt=f"one token {i}", max_tokens=1) for i in range(24)))
        finally:
            await c.close()

    assert all(len(o.token_ids) == 1 for o in asyncio.run(go()))


def normal_finish(address: str) -> None:
    client = Client(address, timeout_s=120)
    out = client.generate("a few tokens", max_tokens=8, ignore_eos=True)
    assert len(out.token_ids) == 8


def cancelled(address: str) -> None:
    client = Client(address, timeout_s=120)
    stream = client.stream("cancel me midway", max_tokens=900, ignore_eos=True)
    got = 0
    for resp in stream:
        got += len(resp.token_ids)
        if got >= 3:
            break
    stream.cancel()


def deadline(address: str) -> None:
    client = Client(address, timeout_s=120)
    with pytest.raises(grpc.RpcError) as e:
        Client(address, timeout_s=0.5).generate("a long one " * 10, max_tokens=900, ignore_eos=True)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def invalid(address: str) -> None:
    client = Client(address, timeout_s=120)
    with pytest.raises(grpc.RpcError) as e:
        client.generate("y" * 1100, max_tokens=4)  # over max_model_len
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# In this order: the worker error needs the transport's first sends.
ENDINGS = [worker_error, first_token_finishes, stop_token_first, many_first_token_finishes, normal_finish,
           cancelled, deadline, invalid]


def test_every_way_a_request_ends_frees_both_workers_blocks_within_a_second(cluster):
    _, address = cluster
    took = {}
    for ending in ENDINGS:
        ending(address)
        took[ending.__name__] = freed_within(address, ending.__name__)
    slow = {name: round(t, 2) for name, t in took.items() if t >= FREE_WITHIN_S}
    assert not slow, f"blocks still held after {FREE_WITHIN_S} s: {slow}"
