"""router.request_timeout_s on a live tiny cluster: a request that runs longer
ends with DEADLINE_EXCEEDED and its KV is freed on both workers."""

from __future__ import annotations

import time

import grpc
import pytest

from benchmarks.deployments import make_config, running
from kvtransfer.faults import TransferFaults
from router.client import Client
from tests.integration.clusters import block_usage, wait_until


def test_a_request_past_request_timeout_s_ends_and_frees_its_kv(ray_head):
    # Every KV push is held up 4 s, so a request that needs its KV moved is
    # still in flight (decode blocks reserved, prefill KV held) at the 1.5 s timeout.
    cfg = make_config(router={"request_timeout_s": 1.5})
    with running(cfg, faults=TransferFaults(delay_s=4.0)) as (_, address):
        client = Client(address)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            client.generate("a long answer please", max_tokens=50, ignore_eos=True)
        took = time.monotonic() - t0
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
        assert "router.request_timeout_s" in e.value.details()
        assert 1.4 < took < 4.0, took  # ended by the router's timeout, not by the slow push finishing
        wait_until(lambda: all(used == 0 for used, _ in block_usage(address).values()), 5,
                   "blocks freed on both workers")
        # Still serving: a request that needs no KV moved (its first token ends it) finishes in time.
        assert client.generate("still serving", max_tokens=1).finish_reason == "length"
