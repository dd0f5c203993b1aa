"""benchmarks.prefix_cache without a cluster: its two arms are valid configs
that differ only in caching and routing, and its figures come from the records."""

from __future__ import annotations

import json

import pytest

from benchmarks.prefix_cache import FULL, POLICY_ARMS, arm_config, reduction, render_markdown, summarize, ttft_stages
from benchmarks.slo import RequestRecord
from cluster.config import parse_config


def test_arms_differ_only_in_caching_and_routing():
    off, on = (parse_config(arm_config(a, FULL, "builtin:tiny-llama", "ns")) for a in ("off", "on"))
    assert not off.pools.prefill.prefix_caching and not off.pools.decode.prefix_caching
    assert on.pools.prefill.prefix_caching and on.pools.decode.prefix_caching
    assert (off.router.policy, on.router.policy) == ("least_loaded", "prefix_aware")
    assert (off.router.conditional_prefill_max_tokens, on.router.conditional_prefill_max_tokens) == (0, 128)
    assert off.pools.counts() == on.pools.counts() and off.pools.decode.num_cpus == on.pools.decode.num_cpus


def test_policy_arms_differ_only_in_policy_and_have_two_decode_workers():
    ll, pa = (parse_config(arm_config(a, FULL, "builtin:tiny-llama", "ns")) for a in POLICY_ARMS)
    assert (ll.router.policy, pa.router.policy) == ("least_loaded", "prefix_aware")
    assert ll.pools.counts() == pa.pools.counts() == (1, 2)
    for cfg in (ll, pa):
        assert cfg.pools.prefill.prefix_caching and cfg.pools.decode.prefix_caching
        assert cfg.router.conditional_prefill_max_tokens == FULL.conditional_tokens


def record(i: int, ttft_s: float, turn: int | None, worker: str = "", **server) -> RequestRecord:
    return RequestRecord(i, f"r{i}", start_s=0.0, end_s=1.0, token_times_s=[ttft_s], token_counts=[1],
                         finish_reason="length", turn=turn, server=server, path="disaggregated",
                         decode_worker=worker)


def test_summary_and_reduction():
    recs = [record(0, 1.0, 0, transfer_bytes=100.0), record(1, 0.2, 1, transfer_bytes=20.0),
            record(2, 0.4, 2, transfer_bytes=30.0)]
    s = summarize(recs, {"prefill": (10, 100)}, {"prefill": (60, 200), "decode": (0, 0)})
    assert s["ttft_p50_ms"] == pytest.approx(400) and s["ttft_p50_turns_2_5_ms"] == pytest.approx(300)
    assert s["transfer_bytes_mean"] == pytest.approx(50) and s["paths"] == {"disaggregated": 3}
    assert s["hit_rate"] == {"prefill": 0.5, "decode": None}
    assert s["ttft_p50_by_turn_ms"] == {1: pytest.approx(1000), 2: pytest.approx(200), 3: pytest.approx(400)}
    assert reduction(1000.0, 200.0) == pytest.approx(0.8) and reduction(None, 1.0) is None


def test_ttft_stages_and_rest_come_from_the_timings():
    recs = [record(0, 0.300, 1, queue_ms=10.0, prefill_ms=200.0, transfer_ms=50.0),
            record(1, 0.500, 2, queue_ms=30.0, prefill_ms=400.0)]
    st = ttft_stages(recs)
    assert st["queue_ms"] == pytest.approx(20) and st["prefill_ms"] == pytest.approx(300)
    assert st["transfer_ms"] == pytest.approx(25) and st["prefill_queue_ms"] == 0
    assert st["rest"] == pytest.approx(55)  # medians of 40 and 70
    assert ttft_stages([]) == {}


def test_report_has_the_policy_table_and_worker_spread():
    recs = [record(0, 0.3, 0, "d0"), record(1, 0.2, 1, "d0"), record(2, 0.4, 2, "d1")]
    s = summarize(recs, {}, {"decode": (5, 10)})
    assert s["decode_workers"] == {"d0": 2, "d1": 1}
    result = {"model": "m", "load_before": (0.0, 0.0, 0.0), "load_after": (0.0, 0.0, 0.0),
              "settings": {**FULL.__dict__, "policy_concurrency": 4}, "workloads": {"multi-turn": {"off": s, "on": s,
              "ttft_p50_reduction": 0.0, "ttft_p50_turns_2_5_reduction": 0.0}},
              "policies": {"multi-turn": {"least_loaded": s, "prefix_aware": s, "ttft_p50_reduction": 0.0}}}
    md = render_markdown(result)
    assert "| multi-turn | least_loaded |" in md and "| 2 / 1 |" in md
    assert "prefix_aware TTFT p50 0% lower than least_loaded" in md
    result["policies"]["multi-turn"]["ttft_p50_reduction"] = -0.69
    assert "prefix_aware TTFT p50 69% higher than least_loaded" in render_markdown(result)


def test_report_shows_the_saving_turn_by_turn():
    off = summarize([record(0, 1.0, 0), record(1, 2.0, 1), record(2, 1.2, 0), record(3, 2.2, 1)], {}, {})
    on = summarize([record(0, 1.0, 0), record(1, 0.5, 1), record(2, 1.2, 0), record(3, 0.7, 1)], {}, {})
    result = {"model": "m", "load_before": (0, 0, 0), "load_after": (0, 0, 0),
              "settings": {**FULL.__dict__, "turn_output": (32, 96), "output_tokens": (16, 16)},
              "workloads": {"multi-turn": {"off": off, "on": on, "ttft_p50_reduction": 0.5,
                                           "ttft_p50_turns_2_5_reduction": 0.7}}}
    text = render_markdown(json.loads(json.dumps(result)))  # as read back from the JSON: string keys
    assert "turn 1 1100 -> 1100 ms (+0%), turn 2 2100 -> 600 ms (-71%)" in text
    # The answer lengths set how fast the history grows: the report names them.
    assert "16-token answers; multi-turn 4 conversations of 5 turns, 32-96-token answers" in text
