"""The Grafana dashboard: the checked-in file is what the generator makes,
and every query names a metric that observability.metrics really exposes."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from observability import dashboard
from observability import metrics as m
from tests.observability.test_metrics import full_report, full_status

METRIC_RE = re.compile(r"\bsplitserve_[a-z0-9_]+")


def exposed_sample_names() -> set[str]:
    """Every sample name a registry with router metrics and a fully reporting worker exposes."""
    reg = CollectorRegistry()
    m.RouterMetrics(reg).observe_request("ok", num_prompt_tokens=1, num_output_tokens=2, ttft_s=0.1, e2e_s=0.2)
    reg.register(m.WorkerStatusCollector(lambda: [full_status("p0", "prefill"), full_status("d0", "decode")]))
    reg.register(m.AutoscaleCollector(full_report))
    text = generate_latest(reg).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def all_queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_checked_in_dashboard_matches_the_generator():
    assert dashboard.DASHBOARD_PATH.read_text() == dashboard.render(), "run: python -m observability.dashboard"
    assert dashboard.main(["--check"]) == 0


def test_check_flags_drift_and_a_missing_file(tmp_path, capsys):
    out = tmp_path / "dash.json"
    assert dashboard.main(["--check", "--out", str(out)]) == 1
    assert dashboard.main(["--out", str(out)]) == 0
    assert dashboard.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace(m.TTFT, "splitserve_ttft"))
    assert dashboard.main(["--check", "--out", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_every_query_names_an_exposed_metric():
    exposed = exposed_sample_names()
    dash = dashboard.build_dashboard()
    referenced = set()
    for expr in all_queries(dash):
        names = METRIC_RE.findall(expr)
        assert names, f"query names no splitserve metric: {expr}"
        for name in names:
            assert name in exposed, f"{name} (in {expr}) is not exposed by observability.metrics"
        referenced.update(names)
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    # The headline metrics are all on the dashboard.
    for name in (m.TTFT + "_bucket", m.TPOT + "_bucket", m.ITL + "_bucket", m.E2E + "_bucket",
                 m.STAGE + "_sum", m.STAGE + "_bucket", m.REQUESTS, m.W_WAITING, m.W_RUNNING, m.W_KV_BLOCKS,
                 m.W_MBU, m.W_MFU, m.W_XFER_BYTES, m.W_BATCH, m.AS_TARGET, m.AS_DECISIONS,
                 m.AS_ATTAINMENT, m.AS_SWITCH_SECONDS, m.AS_START_SECONDS):
        assert name in referenced, name


def test_panels_are_well_formed():
    dash = dashboard.build_dashboard()
    json.dumps(dash)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dash["panels"]}
    for wanted in ("Time to first token", "Time per output token", "Inter-token latency", "End-to-end latency",
                   "Mean time per stage", "Requests by outcome", "Queue depth (waiting sequences)",
                   "Running sequences", "KV cache used", "MBU", "MFU", "KV transfer throughput"):
        assert wanted in titles, wanted
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs))
    latency = next(p for p in dash["panels"] if p["title"] == "Time to first token")
    assert {t["legendFormat"] for t in latency["targets"]} >= {"p50", "p99"}
    assert all("histogram_quantile" in t["expr"] for t in latency["targets"])
