"""benchmarks.prefix_cache without a cluster: its two arms are valid configs
that differ only in caching and routing, and its figures come from the records."""

from __future__ import annotations

import pytest

from benchmarks.prefix_cache import FULL, arm_config, reduction, summarize
from benchmarks.slo import RequestRecord
from cluster.config import parse_config


def test_arms_differ_only_in_caching_and_routing():
    off, on = (parse_config(arm_config(a, FULL, "builtin:tiny-llama", "ns")) for a in ("off", "on"))
    assert not off.pools.prefill.prefix_caching and not off.pools.decode.prefix_caching
    assert on.pools.prefill.prefix_caching and on.pools.decode.prefix_caching
    assert (off.router.policy, on.router.policy) == ("least_loaded", "prefix_aware")
    assert (off.router.conditional_prefill_max_tokens, on.router.conditional_prefill_max_tokens) == (0, 128)
    assert off.pools.counts() == on.pools.counts() and off.pools.decode.num_cpus == on.pools.decode.num_cpus


def record(i: int, ttft_s: float, turn: int | None, **server) -> RequestRecord:
    return RequestRecord(i, f"r{i}", start_s=0.0, end_s=1.0, token_times_s=[ttft_s], token_counts=[1],
                         finish_reason="length", turn=turn, server=server, path="disaggregated")


def test_summary_and_reduction():
    recs = [record(0, 1.0, 0, transfer_bytes=100.0), record(1, 0.2, 1, transfer_bytes=20.0),
            record(2, 0.4, 2, transfer_bytes=30.0)]
    s = summarize(recs, {"prefill": (10, 100)}, {"prefill": (60, 200), "decode": (0, 0)})
    assert s["ttft_p50_ms"] == pytest.approx(400) and s["ttft_p50_turns_2_5_ms"] == pytest.approx(300)
    assert s["transfer_bytes_mean"] == pytest.approx(50) and s["paths"] == {"disaggregated": 3}
    assert s["hit_rate"] == {"prefill": 0.5, "decode": None}
    assert reduction(1000.0, 200.0) == pytest.approx(0.8) and reduction(None, 1.0) is None
