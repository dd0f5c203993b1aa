"""Percentiles, SLO attainment, summaries and goodput against hand-computed values."""

from __future__ import annotations

import math

import pytest

from benchmarks.slo import SLO, RequestRecord, attainment, goodput, meets_slo, percentile, stats, summarize


def rec(i: int, start: float, token_times: list[float], counts: list[int] | None = None, status: str = "OK",
        finish: str | None = "length", **kw) -> RequestRecord:
    counts = counts or [1] * len(token_times)
    return RequestRecord(index=i, request_id=f"r{i}", start_s=start, end_s=(token_times[-1] if token_times else start),
                         token_times_s=token_times, token_counts=counts, status=status, finish_reason=finish,
                         output_tokens=sum(counts), **kw)


def test_percentile_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4, rank = 3 q / 100
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_stats_of_1_to_101():
    s = stats(float(x) for x in range(1, 102))  # rank = q exactly
    assert s == {"n": 101, "mean": 51.0, "p50": 51.0, "p90": 91.0, "p99": 100.0, "max": 101.0}
    assert stats([])["n"] == 0 and math.isnan(stats([])["p50"])


def test_record_latencies():
    r = rec(0, 1.0, [1.2, 1.3, 1.6], counts=[1, 2, 1])  # 4 tokens
    assert r.ttft_s == pytest.approx(0.2)
    assert r.tpot_s == pytest.approx((1.6 - 1.2) / 3)
    assert r.itls_s == pytest.approx([0.1, 0.3])
    assert r.e2e_s == pytest.approx(0.6)
    assert r.ok and r.error_kind is None
    one = rec(1, 0.0, [0.5])
    assert one.tpot_s is None and one.itls_s == []
    assert RequestRecord.from_dict(r.to_dict()) == r


def test_meets_slo_needs_ok_and_both_limits():
    slo = SLO(ttft_ms=100, tpot_ms=50)
    assert meets_slo(rec(0, 0.0, [0.1, 0.15]), slo)  # exactly on both limits
    assert not meets_slo(rec(0, 0.0, [0.101, 0.15]), slo)  # TTFT over
    assert not meets_slo(rec(0, 0.0, [0.05, 0.151]), slo)  # TPOT over
    assert meets_slo(rec(0, 0.0, [0.05]), slo)  # one token: no TPOT to miss
    assert not meets_slo(rec(0, 0.0, [0.01, 0.02], status="UNAVAILABLE"), slo)
    assert not meets_slo(rec(0, 0.0, [0.01, 0.02], finish="abort"), slo)
    assert meets_slo(rec(0, 0.0, [9.0, 99.0]), SLO())  # no limits


def test_attainment_counts_failures_in_the_denominator():
    slo = SLO(ttft_ms=100, tpot_ms=50)
    records = [rec(0, 0.0, [0.05, 0.07]),  # both
               rec(1, 0.0, [0.2, 0.22]),  # TPOT only
               rec(2, 0.0, [0.05, 0.2]),  # TTFT only
               rec(3, 0.0, [], status="RESOURCE_EXHAUSTED", finish=None)]
    assert attainment(records, slo) == {"both": 0.25, "ttft": 0.5, "tpot": 0.5}


def test_summarize():
    slo = SLO(ttft_ms=100, tpot_ms=50)
    records = [rec(0, 0.0, [0.1, 0.12, 0.14], server={"queue_ms": 2.0, "prefill_ms": 10.0, "transfer_ms": 4.0}),
               rec(1, 0.5, [0.55, 0.6, 0.65, 1.0], server={"queue_ms": 4.0, "prefill_ms": 20.0, "transfer_ms": 6.0}),
               rec(2, 0.5, [], status="UNAVAILABLE", finish=None),
               rec(3, 0.6, [0.7], finish="abort")]
    s = summarize(records, slo)
    assert s["num_requests"] == 4 and s["num_ok"] == 2
    assert s["errors"] == {"FINISH_ABORT": 1, "UNAVAILABLE": 1}
    assert s["duration_s"] == pytest.approx(1.0)  # first start 0.0 -> last end 1.0
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["output_tokens"] == 7 and s["output_token_throughput"] == pytest.approx(7.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(75.0)  # 100 and 50
    assert s["tpot_ms"]["max"] == pytest.approx(150.0)  # (1.0 - 0.55) / 3
    assert s["itl_ms"]["n"] == 5 and s["itl_ms"]["max"] == pytest.approx(350.0)
    assert s["e2e_ms"]["mean"] == pytest.approx(320.0)  # 140 and 500
    assert s["attainment"] == {"both": 0.25, "ttft": 0.5, "tpot": 0.25}  # 0 both; 1 TTFT only
    assert s["server_mean"]["queue_ms"] == 3.0 and s["server_mean"]["transfer_ms"] == 5.0
    assert s["length_mismatches"] == 0


def test_goodput_interpolates_between_last_meeting_and_first_missing_rate():
    g = goodput([(1, 1.0), (2, 0.95), (4, 0.7), (8, 0.1)])
    # 2 + (4 - 2) * (0.95 - 0.9) / (0.95 - 0.7) = 2.4
    assert g.rate == pytest.approx(2.4)
    assert g.bracket == (2.0, 4.0) and not g.lower_bound and not g.none_met and not g.non_monotone


def test_goodput_exactly_on_target_and_unsorted_input():
    assert goodput([(3, 0.5), (1, 0.9)]).rate == pytest.approx(1.0)
    assert goodput([(4, 0.0), (2, 1.0)]).rate == pytest.approx(2 + 2 * 0.1)


def test_goodput_edge_cases():
    none = goodput([(1, 0.5), (2, 0.2)])
    assert none.rate == 0.0 and none.none_met and not none.lower_bound
    every = goodput([(1, 1.0), (2, 0.95)])
    assert every.rate == 2.0 and every.lower_bound and every.bracket is None
    dip = goodput([(1, 0.8), (2, 0.95), (4, 0.5)])  # a noisy dip below the chosen rate
    assert dip.non_monotone and dip.rate == pytest.approx(2 + 2 * 0.05 / 0.45)
    assert goodput([(1, 1.0), (2, 0.5)], target=0.5).rate == pytest.approx(2.0)
    assert goodput([]).none_met and goodput([(1, math.nan)]).rate == 0.0
