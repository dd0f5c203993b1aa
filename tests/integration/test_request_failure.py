"""A request the engine fails on its own, through the whole cluster: the
client gets INTERNAL with the engine's message, the request is not retried on
another worker, no worker is blamed or replaced, the requests beside it finish,
and no KV block stays held.

The model is a tiny checkpoint whose logits for one token are NaN
(tests/faulty_model.py): sampled requests cannot be sampled, greedy ones
always pick that token. In disaggregated mode the request fails at its first
token, on the prefill worker; in colocated mode on the decode stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import ray

from benchmarks.deployments import make_config, running
from router.client import AsyncClient, Client
from tests.faulty_model import POISONED_CHAR, write_nan_logit_model
from tests.integration.clusters import block_usage, wait_until

MAX_NEW = 6


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def nan_cluster(request, ray_head, tmp_path_factory):
    name, _ = write_nan_logit_model(tmp_path_factory.mktemp("nan-logit"))
    # Two replicas per pool: a retry would have another worker to go to.
    cfg = make_config(model=name, mode=request.param, replicas=2, ratio="1:1", router={"max_attempts": 3})
    with running(cfg) as (d, address):
        yield d, address


def test_failed_request_gets_internal_alone_and_is_not_retried(nan_cluster):
    d, address = nan_cluster
    servicer = d.deployment.router.servicer
    retries = servicer.runner.retries
    replacements = ray.get(d.deployment.pool_manager.stats.remote(), timeout=30).replacements

    async def go():
        client = AsyncClient(address, timeout_s=120)

        async def sampled():
            try:
                await client.generate(prompt="sample me", max_tokens=MAX_NEW, temperature=0.8, seed=7)
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""

        try:
            return await asyncio.gather(
                sampled(), *(client.generate(prompt=f"greedy {i}", max_tokens=MAX_NEW, ignore_eos=True)
                             for i in range(4)))
        finally:
            await client.close()

    (code, details), *greedy = asyncio.run(go())
    assert code == grpc.StatusCode.INTERNAL, (code, details)
    assert "sampling failed" in details, details
    for out in greedy:
        assert out.text == POISONED_CHAR * MAX_NEW and out.finish_reason == "length", out
    assert servicer.runner.retries == retries  # not tried again elsewhere
    status = Client(address).status()
    assert all(w.alive for p in status.pools for w in p.workers)
    assert ray.get(d.deployment.pool_manager.stats.remote(), timeout=30).replacements == replacements
    wait_until(lambda: all(used == 0 for used, _ in block_usage(address).values()), 5,
               "no block held after the failed request")
    # The workers serve on.
    assert Client(address).generate("after the failure", max_tokens=3, ignore_eos=True).finish_reason == "length"
