"""The pure parts of benchmarks.autoscale: the trace, worker-seconds, per-arm figures, the comparison,
the report, and the committed plot against the figures committed next to it (drift)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import autoscale_report as rep
from benchmarks.slo import RequestRecord

DOCS = Path(__file__).resolve().parents[2] / "docs"
SLOS = {"short": rep.SLO_SHORT, "long": rep.SLO_LONG}


# ----------------------------------------------------------------------- trace
def test_trace_steps_rate_and_shifts_mix_per_phase():
    phases = (rep.Phase("a", 100.0, 0.5, 0.0), rep.Phase("b", 100.0, 3.0, 0.0), rep.Phase("c", 100.0, 1.0, 1.0))
    ev = rep.trace_events(phases, seed=5)
    assert ev == rep.trace_events(phases, seed=5) and ev != rep.trace_events(phases, seed=6)
    assert [e.t for e in ev] == sorted(e.t for e in ev) and all(0 <= e.t < 300 for e in ev)
    per = [[e for e in ev if e.phase == k] for k in range(3)]
    assert all(100 * k <= e.t < 100 * (k + 1) for k in range(3) for e in per[k])
    # Poisson counts: mean rate * 100 s, well inside 4 standard deviations.
    for k, want in enumerate((50, 300, 100)):
        assert abs(len(per[k]) - want) < 4 * math.sqrt(want), (k, len(per[k]))
    assert {e.kind for e in per[0] + per[1]} == {"short"} and {e.kind for e in per[2]} == {"long"}
    # Scaling the rate scales the counts.
    assert len(rep.trace_events(phases, seed=5, scale=2.0)) > 1.6 * len(ev)
    assert rep.phase_starts(phases) == [0.0, 100.0, 200.0]
    assert rep.mean_rate(phases) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        rep.Phase("bad", 10.0, 1.0, 1.5)


def test_default_trace_is_decode_bound_then_prefill_bound():
    ev = rep.trace_events(rep.DEFAULT_PHASES, seed=0)
    by = lambda k, kind: sum(e.phase == k and e.kind == kind for e in ev)  # noqa: E731
    assert by(1, "short") > 3 * by(0, "short")  # the rate steps up ...
    assert by(2, "long") > 3 * by(2, "short") and by(1, "long") == 0  # ... and the mix moves to long prompts
    assert by(3, "short") + by(3, "long") < by(1, "short") / 2  # ... and back down


# ------------------------------------------------------------------ arithmetic
def test_worker_seconds_is_a_step_integral():
    samples = [(0.0, 2.0), (10.0, 3.0), (20.0, 4.0), (25.0, 2.0)]
    assert rep.worker_seconds(samples, 0.0, 30.0) == pytest.approx(20 + 30 + 20 + 10)
    assert rep.worker_seconds(samples, 5.0, 22.0) == pytest.approx(10 + 30 + 8)
    # Before the first sample its value holds; after the last, the last.
    assert rep.worker_seconds([(2.0, 3.0)], 0.0, 4.0) == pytest.approx(12.0)
    assert rep.worker_seconds([], 0.0, 4.0) == 0.0 == rep.worker_seconds(samples, 5.0, 5.0)


def record(i: int, kind: str, sent: float, ttft: float, tpot: float, n: int = 4, ok: bool = True) -> RequestRecord:
    toks = [sent + ttft + k * tpot for k in range(n)]
    return RequestRecord(index=i, request_id=f"r{i}", kind=kind, output_tokens=n, scheduled_s=sent, start_s=sent,
                         end_s=toks[-1], token_times_s=toks, token_counts=[1] * n,
                         finish_reason="length" if ok else None, status="OK" if ok else "UNAVAILABLE")


def test_analyze_run_counts_met_requests_per_worker_second():
    phases = (rep.Phase("a", 10.0, 1.0, 0.0), rep.Phase("b", 10.0, 1.0, 1.0))
    recs = [record(0, "short", 1.0, 0.5, 0.1),          # meets the short SLO
            record(1, "short", 2.0, 3.0, 0.1),          # TTFT over 2 s
            record(2, "short", 3.0, 0.5, 0.3),          # TPOT over 250 ms
            record(3, "long", 12.0, 5.0, 0.1),          # meets the long SLO (6 s TTFT)
            record(4, "long", 13.0, 0.5, 0.1, ok=False)]  # failed
    samples = [(0.0, 2.0), (10.0, 4.0)]
    a = rep.analyze_run(recs, samples, SLOS, phases, window_s=10.0)
    assert (a["sent"], a["ok"], a["met"]) == (5, 4, 2)
    assert a["attainment"] == {"short": pytest.approx(1 / 3), "long": 0.5, "all": 0.4}
    assert [p["attainment"] for p in a["by_phase"]] == [pytest.approx(1 / 3), 0.5]
    assert a["span_s"] == 20.0 and a["worker_seconds"] == pytest.approx(20 + 40)
    assert a["avg_workers"] == pytest.approx(3.0) and a["met_per_worker_second"] == pytest.approx(2 / 60)
    assert [(t, n) for t, _, n in a["over_time"]] == [(0.0, 3), (10.0, 2)]
    assert a["errors"] == ["UNAVAILABLE"]


def test_comparison_picks_the_best_static_split_and_the_goodput_per_worker():
    def arm(met_per_ws, ws, att):
        return {"runs": {"1": {"met_per_worker_second": met_per_ws, "worker_seconds": ws, "avg_workers": ws / 100,
                               "attainment": {"all": att}}}}
    result = {"arms": {rep.AUTOSCALED: arm(0.4, 250, 0.95), "1:2": arm(0.3, 300, 0.8), "2:1": arm(0.2, 300, 0.6)}}
    for a in result["arms"].values():
        a["goodput"] = rep.arm_goodput(a["runs"], base_rate=1.0)
    c = rep.compare(result)
    assert c["per_scale"]["1"]["best_static"] == "1:2"
    assert c["per_scale"]["1"]["ratio"] == pytest.approx(0.4 / 0.3) and c["per_scale"]["1"]["met"]
    assert c["per_scale"]["1"]["worker_seconds_ratio"] == pytest.approx(250 / 300)
    # One scale: the autoscaled arm met 90 % (a lower bound), the static ones did not (0).
    assert result["arms"][rep.AUTOSCALED]["goodput"]["lower_bound"]
    assert result["arms"][rep.AUTOSCALED]["goodput"]["per_worker"] == pytest.approx(1.0 / 2.5)
    assert result["arms"]["1:2"]["goodput"]["per_worker"] == 0.0


# ---------------------------------------------------------- committed figures
def test_committed_plot_is_drawn_from_the_committed_figures(tmp_path):
    """docs/autoscale.png carries the digest of the figures it shows; docs/autoscale.json holds them.
    Re-running the benchmark with ``--json docs/autoscale.json --plot docs/autoscale.png`` keeps them
    in step; editing one without the other fails here. The report renders from the JSON too."""
    pytest.importorskip("matplotlib")
    result = json.loads((DOCS / "autoscale.json").read_text())
    assert rep.plot_digest(DOCS / "autoscale.png") == rep.figures_digest(result)
    # The plot regenerates from the JSON alone, with the same digest.
    out = rep.write_plot(result, tmp_path / "a.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rep.plot_digest(out) == rep.figures_digest(result)
    md = rep.render_markdown(result)
    assert "### Headline" in md and rep.AUTOSCALED in md


@pytest.mark.parametrize("workers", [(2, 4), (3, 3), (4, 4)])
def test_the_autoscaled_arm_starts_at_its_minimum_total_and_validates(workers):
    from benchmarks.autoscale import AUTOSCALED, Settings, arm_config, main, start_split, totals

    auto = {**dict(Settings().autoscale), "min_total": workers[0], "max_total": workers[1]}
    settings = Settings(autoscale=tuple(auto.items()))
    assert totals(settings) == workers
    cfg = arm_config(AUTOSCALED, "builtin:tiny-llama", settings)
    p, d = (int(x) for x in start_split(workers[0]).split(":"))
    assert p >= 1 and d >= p and p + d == workers[0]
    assert cfg.pools.replicas == workers[0] and cfg.pools.autoscale.max_total == workers[1]
    with pytest.raises(SystemExit):  # one worker cannot hold both pools
        main(["--workers", "1:3"])


def test_the_controls_advisory_and_static_first_reach_the_settings():
    """--advisory: the autoscaled arm polls and decides but changes nothing; --static-first: the order control."""
    from benchmarks.autoscale import AUTOSCALED, arm_config, parse_args

    _, settings = parse_args(["--workers", "3:3", "--advisory", "--static", "1:2", "--static-first"])
    assert settings.static == ("1:2",) and settings.static_first
    cfg = arm_config(AUTOSCALED, "builtin:tiny-llama", settings)
    assert cfg.pools.autoscale.advisory and cfg.pools.replicas == 3
    _, plain = parse_args([])
    assert not plain.static_first and not arm_config(AUTOSCALED, "builtin:tiny-llama", plain).pools.autoscale.advisory
    with pytest.raises(SystemExit):  # the default splits follow the autoscaled arm, which would not have run yet
        parse_args(["--static-first"])


def _report(decisions: dict[str, int], targets, action="hold", switch_s=None) -> "AutoscaleReport":
    from observability.autoscale import AutoscaleReport

    return AutoscaleReport(advisory=False, decisions=tuple(decisions.items()), last_action=action,
                           last_reason=f"why {action}", last_decision_at=0.0, targets=targets, live=targets,
                           pending=0, capped=0, role_switches=1 if switch_s else 0, switch_failures=0,
                           last_switch_s=switch_s, last_start_s=None, prefill_share=None, ttft_attainment=None,
                           tpot_attainment=None)


def test_the_sampler_reads_the_pool_managers_routing_table_into_decisions():
    """The routing table as the pool manager returns it (a frozen value, not a dict) -> samples -> decisions."""
    from benchmarks.autoscale import decisions_and_latencies, table_sample
    from kvtransfer.endpoints import InProcEndpoint
    from worker_common.routing_table import RoutingTable, TableWorker

    def table(kinds: tuple[str, ...], report) -> RoutingTable:
        workers = tuple(TableWorker(f"w{i}", k, None, InProcEndpoint(worker_id=f"w{i}"), "node")
                        for i, k in enumerate(kinds))
        return RoutingTable("inc", 1, {"prefill": kinds.count("prefill"), "decode": kinds.count("decode")}, workers,
                            report)

    samples = [
        table_sample(0.0, table(("prefill", "decode", "decode"), _report({"hold": 3}, (1, 2)))),
        table_sample(0.5, table(("prefill", "decode"), _report({"hold": 3, "rebalance": 1}, (2, 1), "rebalance"))),
        table_sample(2.0, table(("prefill", "prefill", "decode"),
                                _report({"hold": 4, "rebalance": 1}, (2, 1), switch_s=1.5))),
    ]
    assert [s["live"] for s in samples] == [(1, 2), (1, 1), (2, 1)]
    decisions, lat = decisions_and_latencies(samples)
    assert decisions == [{"t": 0.5, "action": "rebalance", "targets": [2, 1], "reason": "why rebalance"}]
    assert lat["switch_s"] == [1.5] and lat["decision_to_serving_s"] == [1.5]
