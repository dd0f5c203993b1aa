"""The pure parts of benchmarks.colocated_vs_disaggregated: arm configs, the trace, the ITL split, the report."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest

from benchmarks import colocated_vs_disaggregated as cvd
from benchmarks import cvd_report as report
from benchmarks.slo import SLO, RequestRecord, summarize
from benchmarks.workloads import BenchRequest
from cluster.config import parse_config


# --------------------------------------------------------------------- configs
def test_arm_configs_validate_with_equal_total_cpus():
    cfgs = {arm: parse_config(cvd.arm_config(arm)) for arm in report.ARMS}
    totals = {arm: cvd.total_cpus(c) for arm, c in cfgs.items()}
    assert len(set(totals.values())) == 1, totals
    assert totals["colocated"] == report.REPLICAS * report.WORKER_CPUS
    # Two workers in every arm, each with the same num_cpus.
    assert cfgs["colocated"].pools.counts() == (0, 2) == cfgs["chunked"].pools.counts()
    assert cfgs["disaggregated"].pools.counts() == (1, 1)
    assert cfgs["disaggregated"].pools.prefill.num_cpus == cfgs["disaggregated"].pools.decode.num_cpus
    assert cfgs["disaggregated"].kvtransfer.backend == "gloo"
    # (d) is (b) plus prefix-aware routing and conditional disaggregation.
    assert cfgs["conditional"].pools == cfgs["disaggregated"].pools
    assert cfgs["conditional"].router.policy == "prefix_aware"
    assert cfgs["conditional"].router.conditional_prefill_max_tokens == report.CONDITIONAL_TOKENS
    assert cfgs["disaggregated"].router.conditional_prefill_max_tokens == 0


def test_arm_configs_chunking():
    co, ch = (parse_config(cvd.arm_config(a, chunk_tokens=64)) for a in ("colocated", "chunked"))
    assert co.pools.mode == ch.pools.mode == "colocated"
    # (a): a whole long prompt fits one step; (c): it is split into chunks.
    assert co.pools.decode.max_batched_tokens >= report.LONG_INPUT[1]
    assert ch.pools.decode.max_batched_tokens == 64 < report.LONG_INPUT[0]
    assert co.model.max_model_len == report.MAX_MODEL_LEN >= report.LONG_INPUT[1] + report.LONG_OUTPUT
    # Each arm in its own namespace, router on a free port.
    assert len({parse_config(cvd.arm_config(a)).ray.namespace for a in report.ARMS}) == len(report.ARMS)
    assert co.router.port == 0
    with pytest.raises(ValueError):
        cvd.arm_config("nope")


# ----------------------------------------------------------------------- trace
def test_trace_times_are_seeded_and_the_reference_is_a_prefix():
    spec = cvd.TraceSpec(duration_s=30, short_rate=1.0, long_every_s=10, long_first_s=4, seed=3)
    assert spec.long_times() == [4, 14, 24]
    shorts = spec.short_times()
    assert shorts == cvd.TraceSpec(30, 1.0, 10, 4, seed=3).short_times()
    assert shorts[0] == 0.0 and all(0 <= t < 30 for t in shorts) and shorts == sorted(shorts)
    ref = cvd.TraceSpec(12, 1.0, 10, 4, seed=3, with_long=False)
    assert ref.long_times() == []
    assert ref.short_times() == [t for t in shorts if t < 12]


def _req(i: int, kind: str) -> BenchRequest:
    n_in, n_out = (report.SHORT_INPUT, report.SHORT_OUTPUT) if kind == "short" else (900, report.LONG_OUTPUT)
    return BenchRequest(i, kind, n_in, n_out, prompt=f"{kind} {i}")


def test_build_trace_merges_in_time_order():
    pool = cvd.RequestPool([_req(i, "short") for i in range(50)], [_req(i, "long") for i in range(5)], [], [])
    spec = cvd.TraceSpec(duration_s=25, short_rate=0.8, long_every_s=10, long_first_s=4)
    requests, times = cvd.build_trace(spec, pool)
    assert list(times) == sorted(times)
    assert [r.index for r in requests] == list(range(len(requests)))
    assert sum(r.kind == "long" for r in requests) == 3
    assert [t for t, r in zip(times, requests) if r.kind == "long"] == [4, 14, 24]
    assert [r.prompt for r in requests if r.kind == "short"] == [f"short {i}" for i in range(len(spec.short_times()))]
    arrival = cvd.Scheduled(times)
    assert arrival.schedule(len(requests)) == list(times)
    with pytest.raises(ValueError):
        arrival.schedule(len(requests) + 1)


# -------------------------------------------------------------------- analysis
def rec(i: int, kind: str, start: float, token_times: list[float]) -> RequestRecord:
    return RequestRecord(index=i, request_id=f"r{i}", kind=kind, start_s=start, end_s=token_times[-1],
                         token_times_s=token_times, token_counts=[1] * len(token_times), finish_reason="length",
                         output_tokens=len(token_times))


def fake_run(stall_s: float, step_s: float = 0.1) -> list[RequestRecord]:
    """A short request decoding every ``step_s``, with one ``stall_s`` gap while a long prompt
    (1.0-2.55 s) is in flight, and a second short request after it."""
    t, times = 0.5, []
    while t < 4.0:
        times.append(round(t, 6))
        t += stall_s if 1.2 <= t < 1.2 + step_s / 2 else step_s
    return [rec(0, "short", 0.3, times), rec(1, "long", 1.0, [2.4, 2.45, 2.5, 2.55]),
            rec(2, "short", 3.0, [3.2, 3.3, 3.4])]


def test_split_itls_by_long_requests_in_flight():
    recs = fake_run(stall_s=1.0)
    windows = report.long_windows(recs)
    assert windows == [(1.0, 2.55)]
    during, quiet, points = report.split_itls(recs, windows)
    assert max(during) == pytest.approx(1000.0)
    assert all(g == pytest.approx(100.0) for g in quiet)
    assert len(during) + len(quiet) == len(points) == sum(len(r.token_times_s) - 1 for r in recs if r.kind == "short")
    # The long request's own gaps are not short-request ITL.
    assert all(p[0] <= 2.4 or p[0] > 2.55 or p[2] for p in points)


def test_attainment_by_kind_uses_each_kinds_slo():
    recs = fake_run(stall_s=1.0)
    slo_short, slo_long = SLO(ttft_ms=250, tpot_ms=200), SLO(ttft_ms=1000, tpot_ms=100)
    att = report.attainment_by_kind(recs, {"short": slo_short, "long": slo_long})
    # r0: TTFT 200 ms ok; r2: TTFT 200 ms ok; the long one: TTFT 1400 ms > 1000 -> miss.
    assert att == {"short": 1.0, "long": 0.0, "all": pytest.approx(2 / 3)}


def fake_result() -> dict:
    settings = cvd.QUICK
    arms = {}
    for arm, stall in (("colocated", 2.0), ("disaggregated", 0.2), ("chunked", 0.4)):
        run = report.analyze_run(fake_run(stall), settings.slo_short, settings.slo_long)
        run["env"] = {"other_cores": 0.1, "loadavg_1m": 1.0}
        arms[arm] = {"runs": {report.rate_key(settings.rates[0]): run},
                     "saturation": {"output_token_throughput": {"colocated": 100.0, "disaggregated": 60.0,
                                                                "chunked": 90.0}[arm],
                                    "request_throughput": 1.0, "tpot_ms": {"p50": 80.0}, "ttft_ms": {"p50": 200.0},
                                    "env": {"other_cores": 0.0}}}
    arms["disaggregated"]["reference"] = report.analyze_run(fake_run(0.1))
    return {"model": "builtin:smollm2-135m-instruct", "settings": asdict(settings),
            "configs": {a: {"total_cpus": 2.0} for a in arms},
            "trace": {report.rate_key(settings.rates[0]): {"short_times_s": [0.3, 3.0], "long_times_s": [1.0]}},
            "machine": {"cpu_count": 2, "worker_torch_threads": 1, "busy_cores_before_run": 0.1,
                        "loadavg_before_run": [1, 1, 1], "wall_s": 1.0},
            "arms": arms}


def test_markdown_table_has_every_arm_and_ratios_to_colocated():
    result = fake_result()
    md = report.render_markdown(result)
    for arm in result["arms"]:  # the arms that ran (a subset of report.ARMS here)
        assert report.ARM_TITLES[arm] in md
    row = next(line for line in md.splitlines() if line.startswith("| **short ITL during long prefills** max"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["2000", "200", "400", "0.10×", "0.20×"]
    sat = next(line for line in md.splitlines() if line.startswith("| output throughput (tok/s)") and "100.0" in line)
    assert [c.strip() for c in sat.strip("|").split("|")][-2:] == ["0.60×", "0.90×"]
    # No ratio for counts or environment rows.
    env = next(line for line in md.splitlines() if line.startswith("| other processes' CPU"))
    assert [c.strip() for c in env.strip("|").split("|")][-2:] == ["", ""]
    assert "Undisturbed decode step" in md
    assert "short ITL p99 during long prefills 0.09×; max 0.10×;" in md  # the headline line for (b)
    assert "saturation output tokens/s, (b) disaggregated 1:1 vs (a) colocated: 0.60×" in md


def test_formatting_of_missing_values():
    assert report.fmt_num(None) == report.fmt_num(math.nan) == "–"
    assert report.fmt_num(0.5, "%") == "50%"
    assert report.fmt_ratio(math.nan) == "–" and report.fmt_ratio(report.ratio(3.0, 0.0)) == "–"
    assert report.dig({"a": {"b": 1}}, "a", "b") == 1 and report.dig({"a": None}, "a", "b") is None
    table = report.render_table([("colocated", {"x": 2.0}), ("disaggregated", None)],
                             [("x (ms)", lambda r: r["x"], ".1f")], "colocated")
    assert table.splitlines()[-1] == "| x (ms) | 2.0 | – |  |"


# ---------------------------------------------------------------- interleaving
def test_rounds_rotate_the_arms():
    assert cvd.rotations(["colocated", "disaggregated", "chunked"], 4) == [
        ["colocated", "disaggregated", "chunked"], ["disaggregated", "chunked", "colocated"],
        ["chunked", "colocated", "disaggregated"], ["colocated", "disaggregated", "chunked"]]


def test_merge_rounds_keeps_each_round_on_its_own_stretch_of_time():
    one, two = fake_run(stall_s=1.0), fake_run(stall_s=0.2)
    merged, offsets = cvd.merge_rounds([one, two])
    assert offsets == [0.0, pytest.approx(max(r.end_s for r in one))]
    assert len(merged) == len(one) + len(two)
    assert merged[3].start_s == pytest.approx(two[0].start_s + offsets[1])
    assert merged[3].itls_s == pytest.approx(two[0].itls_s)  # gaps unchanged by the shift
    windows = report.long_windows(merged)
    assert len(windows) == 2 and windows[1][0] >= offsets[1]
    during, quiet, _ = report.split_itls(merged, windows)
    assert max(during) == pytest.approx(1000.0)
    assert sorted(during)[-2] == pytest.approx(200.0)  # round two's stall, inside its own window
    total = summarize(merged, SLO())
    assert total["duration_s"] == pytest.approx(offsets[1] + max(r.end_s for r in two) - one[0].start_s)


def test_merge_env_weights_by_duration():
    env = cvd.merge_env([{"other_cores": 1.0, "own_cores": 2.0, "loadavg_1m": 3.0, "span_s": 10.0},
                         {"other_cores": 0.0, "own_cores": 1.0, "loadavg_1m": 5.0, "span_s": 30.0,
                          "waited_for_quiet_s": 4.0}])
    assert env == {"other_cores": 0.25, "own_cores": 1.25, "other_cores_max": 1.0, "loadavg_1m": 5.0,
                   "waited_for_quiet_s": 4.0}
    assert cvd.merge_env([{"other_cores": None}])["other_cores"] is None


def test_fresh_traces_never_reuse_a_prompt():
    """Caching is on in every arm: a prompt sent twice would measure a cache hit, not a prefill."""
    pool = cvd.RequestPool([_req(i, "short") for i in range(200)], [_req(i, "long") for i in range(20)], [], [])
    specs = [cvd.TraceSpec(25, rate, 10, 4) for rate in (0.5, 0.5, 1.0, 1.0)]
    traces, used = cvd.fresh_traces(specs, pool)
    prompts = [r.prompt for reqs, _ in traces for r in reqs]
    assert len(prompts) == len(set(prompts)) == sum(len(s.short_times()) + len(s.long_times()) for s in specs)
    assert used == sum(len(s.short_times()) for s in specs)
    assert [t for t, r in zip(traces[1][1], traces[1][0]) if r.kind == "long"] == [4, 14, 24]
