"""Generate the Grafana dashboard of a splitserve deployment.

``python -m observability.dashboard`` writes ``deploy/grafana/splitserve-dashboard.json``;
``--check`` writes nothing and exits 1 when the file differs from what this
module generates (a test runs it, so an edited metric name cannot leave the
dashboard behind). Every metric name comes from :mod:`observability.metrics`.

The dashboard has three rows:

1. router latency: TTFT, TPOT, ITL and E2E at p50/p90/p99;
2. requests: mean time per stage (stacked: the parts of a mean request),
   p99 per stage, requests by outcome, token throughput, requests in flight;
3. workers (filtered by the ``kind`` and ``worker`` variables): queue
   depth, running sequences, batch size, KV cache use, MBU and MFU, engine
   busy fraction, computed tokens by phase, KV transfer throughput, prefix
   cache hit rate, cached blocks and evictions;
4. autoscaler (``pools.autoscale``): target and live workers per pool,
   decisions by action, SLO attainment, the prefill share aimed at, pending
   starts, role switches and the time a switch and a fresh start took.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from observability import metrics as m
from observability.stages import Stage

DASHBOARD_PATH = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "splitserve-dashboard.json"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
WORKERS = 'kind=~"$kind", worker_id=~"$worker"'
QUANTILES = (0.5, 0.9, 0.99)


def rate(metric: str, selector: str = "") -> str:
    braces = f"{{{selector}}}" if selector else ""
    return f"rate({metric}{braces}[{RATE}])"


def quantile(q: float, histogram: str, by: str = "") -> str:
    """``histogram_quantile`` over all series of ``histogram``, kept apart by the labels in ``by``."""
    labels = ", ".join(["le", *filter(None, [by])])
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket')}))"


def target(expr: str, legend: str) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


class _Layout:
    """Places panels left to right in rows of 24 grid units and numbers them."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "id": len(self.panels) + 1, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def panel(self, title: str, targets: list[dict[str, Any]], unit: str, *, w: int = 8, h: int = 8,
              stack: bool = False, description: str = "") -> None:
        if self.x + w > 24:
            self._newline()
        refs = [{**t, "refId": chr(ord("A") + i), "datasource": DATASOURCE} for i, t in enumerate(targets)]
        custom: dict[str, Any] = {"fillOpacity": 30 if stack else 0, "stacking": {"mode": "normal" if stack else "none"}}
        self.panels.append({
            "type": "timeseries",
            "title": title,
            "description": description,
            "id": len(self.panels) + 1,
            "datasource": DATASOURCE,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": custom}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": refs,
        })
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0


def _latency_row(lay: _Layout) -> None:
    lay.row("Router latency")
    for title, name, desc in (
        ("Time to first token", m.TTFT, "Router receipt to the first token leaving the router."),
        ("Time per output token", m.TPOT, "Per request: mean gap between tokens after the first."),
        ("Inter-token latency", m.ITL, "Every gap between two consecutive streamed tokens."),
        ("End-to-end latency", m.E2E, "Router receipt to the last token, successful requests."),
    ):
        lay.panel(title, [target(quantile(q, name), f"p{round(q * 100)}") for q in QUANTILES], "s", w=6,
                  description=desc)


def _requests_row(lay: _Layout) -> None:
    lay.row("Requests")
    mean_stage = (f"sum by (stage) ({rate(m.STAGE + '_sum')}) / sum by (stage) ({rate(m.STAGE + '_count')})")
    lay.panel("Mean time per stage", [target(mean_stage, "{{stage}}")], "s", stack=True,
              description=f"Stacked means: {', '.join(s.value.replace('_', ' ') for s in Stage)}.")
    lay.panel("p99 time per stage", [target(quantile(0.99, m.STAGE, "stage"), "{{stage}}")], "s")
    lay.panel("Requests by outcome", [target(f"sum by (outcome) ({rate(m.REQUESTS)})", "{{outcome}}")], "reqps",
              stack=True)
    lay.panel("Token throughput", [target(f"sum({rate(m.PROMPT_TOKENS)})", "prompt"),
                                   target(f"sum({rate(m.GENERATION_TOKENS)})", "generated")], "short",
              w=12, description="Tokens per second.")
    lay.panel("Requests in flight", [target(f"sum({m.IN_FLIGHT})", "in flight")], "short", w=12)


def _workers_row(lay: _Layout) -> None:
    lay.row("Workers")
    by_worker = "{{kind}} {{worker_id}}"
    lay.panel("Queue depth (waiting sequences)", [target(f"{m.W_WAITING}{{{WORKERS}}}", by_worker)], "short")
    lay.panel("Running sequences", [target(f"{m.W_RUNNING}{{{WORKERS}}}", by_worker)], "short")
    lay.panel("Batch size (recent mean)", [target(f"{m.W_BATCH}{{{WORKERS}}}", by_worker)], "short")
    used = f'sum by (kind, worker_id) ({m.W_KV_BLOCKS}{{{WORKERS}, state="used"}})'
    capacity = f"sum by (kind, worker_id) ({m.W_KV_CAPACITY}{{{WORKERS}}})"
    lay.panel("KV cache used", [target(f"{used} / {capacity}", by_worker)], "percentunit")
    lay.panel("KV blocks used", [target(used, by_worker)], "short")
    lay.panel("Engine busy", [target(f"sum by (kind, worker_id) ({rate(m.W_BUSY, WORKERS)})", by_worker)],
              "percentunit", description="Fraction of wall time spent inside engine steps.")
    lay.panel("MBU", [
        target(f"{m.W_MBU}{{{WORKERS}}}", by_worker + " while busy"),
        target(f"sum by (kind, worker_id) ({rate(m.W_MODEL_BYTES, WORKERS)}) / "
               f"sum by (kind, worker_id) ({m.W_PEAK_BW}{{{WORKERS}}})", by_worker + " wall clock"),
    ], "percentunit", description="Modelled bytes moved per second over the peak measured at worker start.")
    lay.panel("MFU", [
        target(f"{m.W_MFU}{{{WORKERS}}}", by_worker + " while busy"),
        target(f"sum by (kind, worker_id) ({rate(m.W_MODEL_FLOPS, WORKERS)}) / "
               f"sum by (kind, worker_id) ({m.W_PEAK_FLOPS}{{{WORKERS}}})", by_worker + " wall clock"),
    ], "percentunit", description="Modelled FLOP/s over the peak measured at worker start.")
    lay.panel("Computed tokens by phase",
              [target(f"sum by (worker_id, phase) ({rate(m.W_TOKENS, WORKERS)})", "{{worker_id}} {{phase}}")],
              "short", description="Tokens per second through the model, recompute included.")
    lay.panel("KV transfer throughput",
              [target(f"sum by (worker_id, direction) ({rate(m.W_XFER_BYTES, WORKERS)})",
                      "{{worker_id}} {{direction}}")], "Bps", w=12)
    lay.panel("Engine steps", [target(f"sum by (kind, worker_id) ({rate(m.W_STEPS, WORKERS)})", by_worker)],
              "short", w=12, description="Steps per second.")
    lay.panel("Prefix cache hit rate",
              [target(f"sum by (kind, worker_id) ({rate(m.W_PREFIX_HIT, WORKERS)}) / "
                      f"sum by (kind, worker_id) ({rate(m.W_PREFIX_QUERIED, WORKERS)})", by_worker)],
              "percentunit", description="Looked-up prompt tokens found cached, over the interval.")
    lay.panel("Cached KV blocks", [target(f"{m.W_CACHED_BLOCKS}{{{WORKERS}}}", by_worker)], "short",
              description="Free blocks still holding a cached prefix (evictable).")
    lay.panel("Prefix cache evictions",
              [target(f"sum by (kind, worker_id) ({rate(m.W_EVICTIONS, WORKERS)})", by_worker)], "short",
              description="Cached blocks evicted per second.")


def _autoscale_row(lay: _Layout) -> None:
    lay.row("Autoscaler")
    lay.panel("Workers per pool", [target(f"{m.AS_TARGET}", "target {{kind}}"),
                                   target(f"{m.AS_LIVE}", "live {{kind}}")], "short",
              description="What the pools are being moved to, and what serves now.")
    lay.panel("Decisions", [target(f"sum by (action) (increase({m.AS_DECISIONS}[{RATE}]))", "{{action}}")],
              "short", stack=True, description="Autoscaler decisions by action (hold included).")
    lay.panel("SLO attainment", [target(f"{m.AS_ATTAINMENT}", "{{slo}}"),
                                 target(f"{m.AS_SHARE}", "prefill share aimed at")], "percentunit",
              description="Share of recent requests within the TTFT / TPOT targets; the split's prefill share.")
    lay.panel("Pending starts and cap", [target(f"{m.AS_PENDING}", "pending starts"),
                                         target(f"increase({m.AS_CAPPED}[{RATE}])", "capped decisions")], "short",
              w=12, description="Workers Ray has not placed (or that are loading), and decisions stopped at max_total.")
    lay.panel("Role switch vs fresh start", [target(f"{m.AS_SWITCH_SECONDS}", "last in-place switch"),
                                             target(f"{m.AS_START_SECONDS}", "last fresh start"),
                                             target(f"increase({m.AS_SWITCHES}[{RATE}])", "switches")], "s",
              w=12, description="Seconds the latest role switch and the latest fresh worker start took.")


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "sort": 1, "hide": 0}


def build_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schema 39)."""
    lay = _Layout()
    _latency_row(lay)
    _requests_row(lay)
    _workers_row(lay)
    _autoscale_row(lay)
    return {
        "title": "splitserve",
        "uid": "splitserve",
        "description": "Disaggregated prefill/decode serving: latency, request stages, per-worker load. "
                       "Generated by `python -m observability.dashboard`; do not edit by hand.",
        "tags": ["splitserve"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            _variable("kind", "Kind", f"label_values({m.W_RUNNING}, kind)"),
            _variable("worker", "Worker", f'label_values({m.W_RUNNING}{{kind=~"$kind"}}, worker_id)'),
        ]},
        "panels": lay.panels,
    }


def render() -> str:
    """The dashboard file's exact text."""
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m observability.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DASHBOARD_PATH, help="where to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else None
        if current != text:
            print(f"{args.out} is out of date; run: python -m observability.dashboard", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
