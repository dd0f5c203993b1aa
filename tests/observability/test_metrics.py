"""Prometheus metrics: router observations, the worker status collector and
the HTTP server, each scraped and parsed back as Prometheus would."""

from __future__ import annotations

import math
import urllib.request
from dataclasses import fields, replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.step_stats import StepStatsSnapshot
from observability import metrics as m
from observability.autoscale import AutoscaleReport
from observability.stages import Stage
from worker_common.worker_status import KVTransferStats, PrefixCacheReport, WorkerStatus


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of everything ``registry`` exposes."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def families(registry: CollectorRegistry) -> dict[str, str]:
    """{family name: type}."""
    return {f.name: f.type for f in text_string_to_metric_families(generate_latest(registry).decode())}


def bucket(samples, name: str, le: float, **labels: str) -> float:
    key = tuple(sorted({**labels, "le": _le(le)}.items()))
    return samples[(name + "_bucket", key)]


def _le(x: float) -> str:
    return "+Inf" if math.isinf(x) else str(float(x))


def test_names_follow_prometheus_conventions():
    names = [m.TTFT, m.TPOT, m.ITL, m.E2E, m.STAGE, m.REQUESTS, m.PROMPT_TOKENS, m.GENERATION_TOKENS, m.IN_FLIGHT,
             *m.WORKER_METRIC_NAMES]
    assert len(set(names)) == len(names)
    for name in names:
        assert name.startswith("splitserve_") and name == name.lower()
    for name in m.ROUTER_HISTOGRAMS:
        assert name.endswith("_seconds")
    for metric in m.WORKER_METRICS:
        assert metric.name.endswith("_total") == (metric.type == "counter"), metric.name


def test_buckets_span_milliseconds_to_minutes():
    assert m.REQUEST_BUCKETS[0] <= 0.001 and m.REQUEST_BUCKETS[-1] >= 120
    assert m.TOKEN_BUCKETS[0] <= 0.001 and m.TOKEN_BUCKETS[-1] >= 10
    assert list(m.REQUEST_BUCKETS) == sorted(set(m.REQUEST_BUCKETS))
    assert list(m.TOKEN_BUCKETS) == sorted(set(m.TOKEN_BUCKETS))


def test_router_metrics_observe_and_scrape():
    reg = CollectorRegistry()
    rm = m.RouterMetrics(reg)
    with rm.track_in_flight():
        assert scrape(reg)[(m.IN_FLIGHT, ())] == 1
        rm.observe_request("ok", num_prompt_tokens=12, num_output_tokens=5, ttft_s=0.2, e2e_s=1.0,
                           stages={Stage.QUEUE: 0.001, Stage.PREFILL: 0.15, Stage.TRANSFER: 0.004, Stage.DECODE: 0.8})
    rm.observe_request("cancelled", num_prompt_tokens=3, num_output_tokens=2, ttft_s=0.03, e2e_s=9.0)
    rm.observe_request("error", num_prompt_tokens=4, num_output_tokens=0, stages={Stage.PREFILL_QUEUE: 0.5})
    rm.count_outcome("rejected")
    for gap in (0.004, 0.02, 0.3):
        rm.observe_token_gap(gap)

    s = scrape(reg)
    assert s[(m.IN_FLIGHT, ())] == 0
    assert s[(m.REQUESTS, (("outcome", "ok"),))] == 1
    assert s[(m.REQUESTS, (("outcome", "cancelled"),))] == 1
    assert s[(m.REQUESTS, (("outcome", "error"),))] == 1
    assert s[(m.REQUESTS, (("outcome", "rejected"),))] == 1
    assert s[(m.REQUESTS, (("outcome", "deadline"),))] == 0      # known outcomes start at zero
    assert s[(m.PROMPT_TOKENS, ())] == 19
    assert s[(m.GENERATION_TOKENS, ())] == 7

    # TTFT: every request that had a first token.
    assert s[(m.TTFT + "_count", ())] == 2
    assert s[(m.TTFT + "_sum", ())] == pytest.approx(0.23)
    assert bucket(s, m.TTFT, 0.025) == 0 and bucket(s, m.TTFT, 0.05) == 1 and bucket(s, m.TTFT, 0.25) == 2
    # E2E and TPOT: ok requests only; TPOT = (1.0 - 0.2) / 4.
    assert s[(m.E2E + "_count", ())] == 1 and s[(m.E2E + "_sum", ())] == pytest.approx(1.0)
    assert s[(m.TPOT + "_count", ())] == 1 and s[(m.TPOT + "_sum", ())] == pytest.approx(0.2)
    assert bucket(s, m.TPOT, 0.15) == 0 and bucket(s, m.TPOT, 0.25) == 1
    # ITL: one sample per gap.
    assert s[(m.ITL + "_count", ())] == 3 and s[(m.ITL + "_sum", ())] == pytest.approx(0.324)
    assert bucket(s, m.ITL, 0.005) == 1 and bucket(s, m.ITL, float("inf")) == 3
    # Stages: labelled, every stage present from the start.
    assert s[(m.STAGE + "_count", (("stage", "prefill"),))] == 1
    assert s[(m.STAGE + "_sum", (("stage", "decode"),))] == pytest.approx(0.8)
    assert s[(m.STAGE + "_count", (("stage", "prefill_queue"),))] == 1
    assert s[(m.STAGE + "_count", (("stage", "decode_queue"),))] == 0
    assert bucket(s, m.STAGE, 0.001, stage="queue") == 1
    assert {dict(labels)["stage"] for name, labels in s if name == m.STAGE + "_count"} == {x.value for x in Stage}

    types = families(reg)
    assert types[m.TTFT] == types[m.STAGE] == "histogram"
    assert types[m.REQUESTS.removesuffix("_total")] == "counter"
    assert types[m.IN_FLIGHT] == "gauge"


def test_router_metrics_refuse_unknown_labels():
    rm = m.RouterMetrics(CollectorRegistry())
    with pytest.raises(ValueError, match="outcome"):
        rm.count_outcome("meh")
    with pytest.raises(ValueError, match="stage"):
        rm.observe_request("ok", num_prompt_tokens=1, num_output_tokens=1, stages={"warmup": 1.0})
    with pytest.raises(ValueError, match="stage"):  # the name alone is not a Stage
        rm.observe_request("ok", num_prompt_tokens=1, num_output_tokens=1, stages={"prefill": 1.0})


def test_two_registries_do_not_clash():
    a, b = CollectorRegistry(), CollectorRegistry()
    m.RouterMetrics(a).count_outcome("ok")
    m.RouterMetrics(b)
    assert scrape(a)[(m.REQUESTS, (("outcome", "ok"),))] == 1
    assert scrape(b)[(m.REQUESTS, (("outcome", "ok"),))] == 0


def full_status(worker_id: str, kind: str) -> WorkerStatus:
    """A status in which every figure is reported (peaks measured, recent steps, push time)."""
    return WorkerStatus(
        worker_id=worker_id, kind=kind,
        running=3, waiting=2, reserved=1, outstanding_tokens=40,
        free_blocks=90, used_blocks=10, num_blocks=100, requests_served=7, preemptions=0,
        step_stats=StepStatsSnapshot(
            steps=50, busy_seconds=2.5, prefill_tokens=400, decode_tokens=45,
            bytes=1e9, flops=2e9, batch_size_sum=150,
            recent_steps=10, recent_seconds=0.5, recent_batch_size=3.0,
            recent_mbu=0.42, recent_mfu=0.07,
            peak_bandwidth_bytes_per_s=2e10, peak_flops_per_s=5e11, window_s=10.0,
        ),
        kv_transfer=KVTransferStats(chunks_sent=4, chunks_received=0, bytes_sent=4096, bytes_received=0,
                                    seconds_sent=0.01, refused_unauthenticated=2),
        held=1, tokens_prefilled=400,
        prefix_cache=PrefixCacheReport(enabled=True, block_size=16, cache_key="k", cached_blocks=12,
                                       queried_tokens=800, hit_tokens=200, evictions=5, block_hashes=(1, 2)),
    )


def test_worker_collector_emits_every_metric_with_labels():
    reg = CollectorRegistry()
    statuses = [full_status("prefill-0", "prefill"), full_status("decode-0", "decode")]
    reg.register(m.WorkerStatusCollector(lambda: statuses))
    s = scrape(reg)
    lab = (("kind", "decode"), ("worker_id", "decode-0"))
    assert s[(m.W_WAITING, lab)] == 2
    assert s[(m.W_RUNNING, lab)] == 3
    assert s[(m.W_RESERVED, lab)] == 1
    assert s[(m.W_OUTSTANDING, lab)] == 40
    assert s[(m.W_KV_BLOCKS, tuple(sorted(lab + (("state", "used"),))))] == 10
    assert s[(m.W_KV_BLOCKS, tuple(sorted(lab + (("state", "free"),))))] == 90
    assert s[(m.W_KV_CAPACITY, lab)] == 100
    assert s[(m.W_SERVED, lab)] == 7
    assert s[(m.W_BATCH, lab)] == 3.0
    assert s[(m.W_MBU, lab)] == 0.42 and s[(m.W_MFU, lab)] == 0.07
    assert s[(m.W_STEPS, lab)] == 50 and s[(m.W_BUSY, lab)] == 2.5
    assert s[(m.W_TOKENS, tuple(sorted(lab + (("phase", "prefill"),))))] == 400
    assert s[(m.W_TOKENS, tuple(sorted(lab + (("phase", "decode"),))))] == 45
    assert s[(m.W_MODEL_BYTES, lab)] == 1e9 and s[(m.W_MODEL_FLOPS, lab)] == 2e9
    assert s[(m.W_PEAK_BW, lab)] == 2e10 and s[(m.W_PEAK_FLOPS, lab)] == 5e11
    plab = (("kind", "prefill"), ("worker_id", "prefill-0"))
    assert s[(m.W_XFER_BYTES, tuple(sorted(plab + (("direction", "sent"),))))] == 4096
    assert s[(m.W_XFER_CHUNKS, tuple(sorted(plab + (("direction", "sent"),))))] == 4
    assert s[(m.W_XFER_SECONDS, tuple(sorted(plab + (("direction", "sent"),))))] == 0.01
    assert s[(m.W_XFER_REFUSED, plab)] == 2
    assert s[(m.W_CACHED_BLOCKS, lab)] == 12 and s[(m.W_EVICTIONS, lab)] == 5
    assert s[(m.W_PREFIX_QUERIED, lab)] == 800 and s[(m.W_PREFIX_HIT, lab)] == 200
    assert s[(m.W_PREFIX_HIT_RATIO, lab)] == 0.25
    # Every declared metric appeared, with the declared type.
    types = families(reg)
    for metric in m.WORKER_METRICS:
        assert types[metric.name.removesuffix("_total")] == metric.type, metric.name


def test_each_worker_metric_reads_its_own_status_attribute():
    """The table maps each series to one WorkerStatus attribute: give every
    numeric attribute a distinct value and each series must report its own."""
    values = iter(range(1, 1000))

    def distinct(cls, **fixed):
        nums = {f.name: float(next(values)) for f in fields(cls) if f.name not in fixed}
        return cls(**nums, **fixed)

    step = distinct(StepStatsSnapshot)
    xfer = distinct(KVTransferStats)
    cache = distinct(PrefixCacheReport, enabled=True, cache_key="k", block_hashes=())
    status = distinct(WorkerStatus, worker_id="w0", kind="decode", step_stats=step, kv_transfer=xfer,
                      prefix_cache=cache)
    reg = CollectorRegistry()
    reg.register(m.WorkerStatusCollector(lambda: [status]))
    s = scrape(reg)
    seen = set()
    for metric in m.WORKER_METRICS:
        for label_value, attribute in metric.series:
            labels = {"worker_id": "w0", "kind": "decode", **({metric.label: label_value} if metric.label else {})}
            obj = status
            for part in attribute.split("."):
                obj = getattr(obj, part)
            assert s[(metric.name, tuple(sorted(labels.items())))] == obj, (metric.name, attribute)
            seen.add(attribute)
    assert len(seen) == sum(len(metric.series) for metric in m.WORKER_METRICS)  # no attribute read twice
    # Only the kind-specific counters, the step/transfer bookkeeping and the raw latency samples (the
    # autoscaler's attainment gauges and the router's histograms report those) stay off the metrics.
    top = {a for a in seen if "." not in a}
    assert {f.name for f in fields(WorkerStatus)} - top == {
        "worker_id", "kind", "preemptions", "step_stats", "kv_transfer", "held", "tokens_prefilled", "tokens_generated",
        "prefix_cache", "recent_latencies"}


def test_worker_collector_emits_nothing_for_unreported_values():
    reg = CollectorRegistry()
    fresh = StepStatsSnapshot(steps=3)  # an idle worker without peaks: recent figures and peaks are None
    statuses = [
        # A decode worker measures no push time.
        replace(full_status("d0", "decode"), step_stats=fresh,
                kv_transfer=KVTransferStats(bytes_received=64)),
        replace(full_status("p0", "prefill"), step_stats=replace(fresh, recent_mbu=float("nan"))),
    ]
    reg.register(m.WorkerStatusCollector(lambda: statuses))
    s = scrape(reg)
    names = {name for name, _ in s}
    for absent in (m.W_MBU, m.W_MFU, m.W_BATCH, m.W_PEAK_FLOPS, m.W_PEAK_BW):
        assert not any(n.startswith(absent.removesuffix("_total")) for n in names), absent
    pushed = [dict(labels)["worker_id"] for name, labels in s if name == m.W_XFER_SECONDS]
    assert pushed == ["p0"]
    assert s[(m.W_STEPS, (("kind", "prefill"), ("worker_id", "p0")))] == 3
    assert s[(m.W_XFER_BYTES, (("direction", "received"), ("kind", "decode"), ("worker_id", "d0")))] == 64
    assert s[(m.W_RESERVED, (("kind", "decode"), ("worker_id", "d0")))] == 1  # zeros that are real are kept
    assert s[(m.W_XFER_REFUSED, (("kind", "decode"), ("worker_id", "d0")))] == 0


def test_worker_collector_survives_a_failing_source():
    reg = CollectorRegistry()
    rm = m.RouterMetrics(reg)
    rm.count_outcome("ok")

    def broken():
        raise RuntimeError("poll failed")

    reg.register(m.WorkerStatusCollector(broken))
    s = scrape(reg)
    assert s[(m.REQUESTS, (("outcome", "ok"),))] == 1
    assert not any(name.startswith("splitserve_worker_") for name, _ in s)


def test_worker_collector_registration_does_not_call_the_source():
    calls = []
    reg = CollectorRegistry()
    reg.register(m.WorkerStatusCollector(lambda: calls.append(1) or []))
    assert calls == []
    with pytest.raises(ValueError, match="Duplicated"):
        reg.register(m.WorkerStatusCollector(lambda: []))


def test_metrics_server_on_an_ephemeral_port():
    reg = CollectorRegistry()
    m.RouterMetrics(reg).count_outcome("ok")
    reg.register(m.WorkerStatusCollector(lambda: [full_status("decode-0", "decode")]))
    server, port = m.start_metrics_server(reg, "127.0.0.1", 0)
    try:
        assert port > 0 and server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[(m.REQUESTS, (("outcome", "ok"),))] == 1
    assert got[(m.W_MBU, (("kind", "decode"), ("worker_id", "decode-0")))] == 0.42


def full_report(**overrides) -> AutoscaleReport:
    """An autoscale report with every optional figure set."""
    base = dict(advisory=False, decisions=(("hold", 7), ("scale_up", 2), ("scale_down", 1), ("rebalance", 1)),
                last_action="scale_up", last_reason="decode pressure", last_decision_at=1.0, targets=(2, 3),
                live=(2, 2), pending=1, capped=4, role_switches=1, switch_failures=0, last_switch_s=0.4,
                last_start_s=6.5, prefill_share=0.4, ttft_attainment=0.95, tpot_attainment=0.8)
    return AutoscaleReport(**{**base, **overrides})


def test_autoscale_collector_exposes_the_report():
    reg = CollectorRegistry()
    reg.register(m.AutoscaleCollector(lambda: full_report()))
    s = scrape(reg)
    assert s[(m.AS_DECISIONS, (("action", "scale_up"),))] == 2
    assert s[(m.AS_TARGET, (("kind", "decode"),))] == 3 and s[(m.AS_LIVE, (("kind", "decode"),))] == 2
    assert s[(m.AS_PENDING, ())] == 1 and s[(m.AS_CAPPED, ())] == 4
    assert s[(m.AS_SWITCHES, ())] == 1 and s[(m.AS_SWITCH_SECONDS, ())] == 0.4
    assert s[(m.AS_START_SECONDS, ())] == 6.5 and s[(m.AS_SHARE, ())] == 0.4
    assert s[(m.AS_ATTAINMENT, (("slo", "tpot"),))] == 0.8 and s[(m.AS_ADVISORY, ())] == 0
    # Figures not known yet are left out, not reported as zero; no report, no series.
    reg = CollectorRegistry()
    reg.register(m.AutoscaleCollector(lambda: full_report(last_switch_s=None, prefill_share=None,
                                                          ttft_attainment=None, tpot_attainment=None)))
    names = {name for name, _ in scrape(reg)}
    assert m.AS_SWITCH_SECONDS not in names and m.AS_SHARE not in names and m.AS_ATTAINMENT not in names
    reg = CollectorRegistry()
    reg.register(m.AutoscaleCollector(lambda: None))
    assert not [k for k in scrape(reg) if k[0].startswith("splitserve_autoscale")]
