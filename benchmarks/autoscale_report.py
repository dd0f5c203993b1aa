"""Trace, arithmetic, Markdown report and plot of ``benchmarks.autoscale`` (pure: no Ray, no torch).

Kept apart from the runner (:mod:`benchmarks.autoscale`) so that each module
has one job and this one is unit-tested without a cluster:

1. the trace: :class:`Phase` s of Poisson arrivals whose rate steps up and
   down and whose mix shifts from short to long prompts (:func:`trace_events`);
2. the cost: worker-seconds from the runner's samples of the workers holding
   resources (:func:`worker_seconds`, a step integral);
3. the figures of one arm (:func:`analyze_arm`): per-kind SLO attainment
   (DistServe sets SLOs per application), attainment over time, SLO-met
   requests per worker-second, and the DistServe goodput (:func:`benchmarks.slo.goodput`)
   over the trace's rate scales, per average worker;
4. the comparison, the Markdown (:func:`render_markdown`) and the PNG
   (:func:`write_plot`), which carries the SHA-256 of the figures it was drawn
   from in its metadata so that a test can tell a stale plot from a fresh one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.slo import SLO, RequestRecord, goodput, meets_slo, stats

SHORT_INPUT, SHORT_OUTPUT = 32, 48       # a chat turn: decode heavy
LONG_INPUT, LONG_OUTPUT = (384, 512), 8  # a document: prefill heavy
SLO_SHORT = SLO(ttft_ms=2000.0, tpot_ms=250.0)
SLO_LONG = SLO(ttft_ms=6000.0, tpot_ms=400.0)
WORKER_CPUS = 0.5   # every worker of every arm (role switching needs both pools alike)
MIN_TOTAL, MAX_TOTAL = 2, 4
TARGET_RATIO = 1.3  # the target: autoscaled >= 1.3x the static split's goodput per worker-second
AUTOSCALED = "autoscaled"
PLOT_HASH_KEY = "splitserve-figures-sha256"


@dataclass(frozen=True)
class Phase:
    """``duration_s`` of Poisson arrivals at ``rate`` req/s, a ``long_fraction`` of them long prompts."""

    label: str
    duration_s: float
    rate: float
    long_fraction: float

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.rate <= 0 or not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"bad phase {self}")


#: Quiet chat, busy chat (decode bound), busy documents (prefill bound), quiet again.
DEFAULT_PHASES = (
    Phase("quiet, short", 30.0, 0.4, 0.0),
    Phase("busy, short", 40.0, 1.6, 0.0),
    Phase("busy, long", 40.0, 0.45, 0.9),
    Phase("quiet, mixed", 30.0, 0.3, 0.3),
)


@dataclass(frozen=True)
class TraceEvent:
    """One send of the trace: its offset (s), its kind (``short``/``long``) and its phase's index."""

    t: float
    kind: str
    phase: int


def phase_starts(phases: Sequence[Phase]) -> list[float]:
    """Each phase's start offset (s); the trace ends at the last start + its duration."""
    out, t = [], 0.0
    for p in phases:
        out.append(t)
        t += p.duration_s
    return out


def trace_events(phases: Sequence[Phase], seed: int = 0, scale: float = 1.0) -> list[TraceEvent]:
    """The trace: per phase, Poisson arrivals at ``rate * scale`` (exponential gaps from one seeded
    generator, restarted at each phase's start) and each send long with probability ``long_fraction``."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    rng = random.Random(seed)
    out: list[TraceEvent] = []
    for k, (p, start) in enumerate(zip(phases, phase_starts(phases))):
        t = start + rng.expovariate(p.rate * scale)
        while t < start + p.duration_s:
            out.append(TraceEvent(round(t, 6), "long" if rng.random() < p.long_fraction else "short", k))
            t += rng.expovariate(p.rate * scale)
    return out


# ------------------------------------------------------------------ arithmetic
def worker_seconds(samples: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    """Integral over [t0, t1] of a step function given as ``(t, workers)`` samples (each value
    holds until the next sample; before the first sample the first value holds)."""
    if t1 <= t0 or not samples:
        return 0.0
    pts = sorted(samples)
    total = 0.0
    for i, (t, w) in enumerate(pts):
        a = t0 if i == 0 else max(t, t0)
        b = min(pts[i + 1][0], t1) if i + 1 < len(pts) else t1
        if b > a:
            total += w * (b - a)
    return total


def met(records: Sequence[RequestRecord], slos: dict[str, SLO]) -> list[bool]:
    """Whether each record meets its kind's SLO."""
    return [meets_slo(r, slos[r.kind]) for r in records]


def attainment_over_time(records: Sequence[RequestRecord], slos: dict[str, SLO], window_s: float,
                         t_end: float) -> list[tuple[float, float | None, int]]:
    """``(window start, attainment of the requests sent in it, how many)`` per ``window_s`` window,
    by send time (``scheduled_s``); ``None`` where nothing was sent."""
    n = max(1, math.ceil(t_end / window_s))
    hits = [[0, 0] for _ in range(n)]
    for r, ok in zip(records, met(records, slos)):
        k = min(n - 1, int(r.scheduled_s // window_s))
        hits[k][0] += ok
        hits[k][1] += 1
    return [(k * window_s, (h / c if c else None), c) for k, (h, c) in enumerate(hits)]


def per_kind_attainment(records: Sequence[RequestRecord], slos: dict[str, SLO]) -> dict[str, float]:
    ok = met(records, slos)
    out = {}
    for kind in slos:
        sel = [m for r, m in zip(records, ok) if r.kind == kind]
        out[kind] = sum(sel) / len(sel) if sel else math.nan
    out["all"] = sum(ok) / len(ok) if ok else math.nan
    return out


def analyze_run(records: Sequence[RequestRecord], samples: Sequence[tuple[float, float]], slos: dict[str, SLO],
                phases: Sequence[Phase], window_s: float = 10.0) -> dict:
    """One run of one arm: attainment (per kind, per phase, over time), SLO-met requests per
    worker-second over the run's span (first send to the trace's end or the last answer, whichever
    is later), latency figures."""
    span = max([sum(p.duration_s for p in phases)] + [r.end_s for r in records if r.end_s is not None])
    ws = worker_seconds(samples, 0.0, span)
    ok = met(records, slos)
    starts = phase_starts(phases)
    by_phase = []
    for k, p in enumerate(phases):
        sel = [m for r, m in zip(records, ok) if starts[k] <= r.scheduled_s < starts[k] + p.duration_s]
        by_phase.append({"label": p.label, "sent": len(sel), "attainment": sum(sel) / len(sel) if sel else None})
    good = [r for r in records if r.ok]
    return {
        "sent": len(records), "ok": len(good), "met": sum(ok),
        "errors": sorted({r.error_kind for r in records if r.error_kind}),
        "attainment": per_kind_attainment(records, slos),
        "by_phase": by_phase,
        "over_time": attainment_over_time(records, slos, window_s, span),
        "span_s": span, "worker_seconds": ws, "avg_workers": ws / span if span > 0 else math.nan,
        "met_per_worker_second": sum(ok) / ws if ws > 0 else math.nan,
        "ttft_ms": {k: stats(r.ttft_s * 1000 for r in good if r.kind == k and r.ttft_s is not None) for k in slos},
        "tpot_ms": {k: stats(r.tpot_s * 1000 for r in good if r.kind == k and r.tpot_s is not None) for k in slos},
    }


def arm_goodput(runs: dict[str, dict], base_rate: float) -> dict:
    """DistServe goodput of one arm over its runs at the trace's rate scales (keys: the scale), and
    that goodput per average worker (DistServe's per-GPU goodput, the worker count averaged over time).
    The offered rate of a scale is ``scale * base_rate`` (the trace's mean rate)."""
    pts = [(float(s) * base_rate, run["attainment"]["all"]) for s, run in runs.items()]
    g = goodput(pts)
    workers = [run["avg_workers"] for run in runs.values()]
    mean_workers = sum(workers) / len(workers) if workers else math.nan
    return {**asdict(g), "avg_workers": mean_workers,
            "per_worker": g.rate / mean_workers if mean_workers and not g.none_met else 0.0}


def mean_rate(phases: Sequence[Phase]) -> float:
    """The trace's offered mean rate (req/s) at scale 1."""
    total = sum(p.duration_s for p in phases)
    return sum(p.rate * p.duration_s for p in phases) / total


def best_static(arms: dict[str, dict], scale: str) -> str | None:
    """The static arm with the most SLO-met requests per worker-second at ``scale``."""
    static = [a for a in arms if a != AUTOSCALED and scale in arms[a]["runs"]]
    return max(static, key=lambda a: arms[a]["runs"][scale]["met_per_worker_second"], default=None)


def compare(result: dict) -> dict:
    """The headline: autoscaled against the best static split, per scale and for the goodput."""
    arms = result["arms"]
    out: dict[str, Any] = {"target": TARGET_RATIO, "per_scale": {}}
    if AUTOSCALED not in arms:
        return out
    for scale, auto in arms[AUTOSCALED]["runs"].items():
        best = best_static(arms, scale)
        if best is None:
            continue
        st = arms[best]["runs"][scale]
        r = ratio(auto["met_per_worker_second"], st["met_per_worker_second"])
        out["per_scale"][scale] = {"best_static": best, "ratio": r,
                                   "met": r >= TARGET_RATIO if math.isfinite(r) else False,
                                   "worker_seconds_ratio": ratio(auto["worker_seconds"], st["worker_seconds"])}
    gps = {a: v.get("goodput") for a, v in arms.items() if v.get("goodput")}
    if AUTOSCALED in gps and len(gps) > 1:
        best = max((a for a in gps if a != AUTOSCALED), key=lambda a: gps[a]["per_worker"])
        out["goodput"] = {"best_static": best, "ratio": ratio(gps[AUTOSCALED]["per_worker"], gps[best]["per_worker"])}
    return out


def ratio(x: float | None, base: float | None) -> float:
    if x is None or base is None or not math.isfinite(x) or not math.isfinite(base) or base == 0:
        return math.nan
    return x / base


def figures_digest(result: dict) -> str:
    """SHA-256 of what the plot shows (every arm's analysis, decisions and worker samples)."""
    keep = {a: {"runs": v["runs"], "samples": v.get("samples"), "decisions": v.get("decisions")}
            for a, v in result["arms"].items()}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------ markdown
def _f(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.0%}" if spec == "%" else format(x, spec)


def render_markdown(result: dict) -> str:
    """The report: trace, one table (arms × figures) per scale, goodput, decisions, latencies, headline."""
    s, m, arms = result["settings"], result["machine"], result["arms"]
    phases = [Phase(**p) for p in s["phases"]]
    out = [
        "## Autoscaled vs static (one run)",
        "",
        f"Model {result['model']}; every worker {WORKER_CPUS:g} CPU (one torch thread); autoscaled "
        f"{s['autoscale']['min_total']}-{s['autoscale']['max_total']} workers, ratio {s['autoscale']['ratio']}. "
        "Trace (seed %d): " % s["seed"] + "; ".join(
            f"{p.label} {p.duration_s:g} s at {p.rate:g} req/s ({p.long_fraction:.0%} long)" for p in phases)
        + f". Short {SHORT_INPUT} in / {SHORT_OUTPUT} out, SLO TTFT ≤ {SLO_SHORT.ttft_ms:g} ms, TPOT ≤ "
        f"{SLO_SHORT.tpot_ms:g} ms; long {LONG_INPUT[0]}-{LONG_INPUT[1]} in / {LONG_OUTPUT} out, TTFT ≤ "
        f"{SLO_LONG.ttft_ms:g} ms, TPOT ≤ {SLO_LONG.tpot_ms:g} ms.",
        f"Machine: {m.get('cpu_count')} CPUs, load average {m.get('loadavg_before_run')} before, "
        f"{m.get('loadavg_after_run')} after; other processes {m.get('other_cores')} cores (mean over the runs); "
        f"wall {m.get('wall_s')} s.",
    ]
    names = list(arms)
    rows = [
        ("requests met SLO / sent", lambda r: f"{r['met']}/{r['sent']}"),
        ("errors", lambda r: ", ".join(r["errors"]) or "0"),
        ("SLO attainment all / short / long", lambda r: " / ".join(
            _f(r["attainment"].get(k), "%") for k in ("all", "short", "long"))),
        ("attainment per phase", lambda r: " / ".join(_f(p["attainment"], "%") for p in r["by_phase"])),
        ("worker-seconds (avg workers)", lambda r: f"{r['worker_seconds']:.0f} ({r['avg_workers']:.2f})"),
        ("**SLO-met requests per worker-second**", lambda r: f"**{_f(r['met_per_worker_second'], '.3f')}**"),
        ("short TTFT p50 / p99 (ms)", lambda r: f"{_f(r['ttft_ms']['short']['p50'], '.0f')} / "
                                                f"{_f(r['ttft_ms']['short']['p99'], '.0f')}"),
        ("short TPOT p50 / p99 (ms)", lambda r: f"{_f(r['tpot_ms']['short']['p50'], '.0f')} / "
                                                f"{_f(r['tpot_ms']['short']['p99'], '.0f')}"),
        ("long TTFT p50 / p99 (ms)", lambda r: f"{_f(r['ttft_ms']['long']['p50'], '.0f')} / "
                                               f"{_f(r['ttft_ms']['long']['p99'], '.0f')}"),
        ("other processes (cores)", lambda r: _f(r.get("other_cores"))),
    ]
    for scale in s["scales"]:
        key = f"{scale:g}"
        cols = [(a, arms[a]["runs"].get(key)) for a in names]
        cols = [(a, r) for a, r in cols if r is not None]
        out += ["", f"### Rate × {scale:g} (mean {mean_rate(phases) * scale:.2f} req/s)", "",
                "| figure | " + " | ".join(a for a, _ in cols) + " |", "|---|" + "---|" * len(cols)]
        for label, get in rows:
            out.append(f"| {label} | " + " | ".join(get(r) for _, r in cols) + " |")
    cmp_ = result.get("comparison", {})
    out += ["", "### Headline", ""]
    for scale, c in cmp_.get("per_scale", {}).items():
        out.append(f"- rate × {scale}: autoscaled vs the best static split ({c['best_static']}): "
                   f"**{_f(c['ratio'])}×** the SLO-met requests per worker-second (target ≥ {TARGET_RATIO:g}×: "
                   f"{'met' if c['met'] else 'not met'}), using {_f(c['worker_seconds_ratio'])}× its worker-seconds")
    gps = {a: v["goodput"] for a, v in arms.items() if v.get("goodput")}
    if gps:
        out += ["", "Goodput (DistServe: the highest offered mean rate at which ≥ 90 % of requests meet their "
                    "kind's SLO, over the rate scales run), and per average worker:", ""]
        for a, g in gps.items():
            out.append(f"- {a}: {g['rate']:.2f} req/s, {g['per_worker']:.3f} req/s per worker "
                       f"({g['avg_workers']:.2f} workers on average; {g['note']})")
        if "goodput" in cmp_:
            out.append(f"- goodput per worker, autoscaled vs {cmp_['goodput']['best_static']}: "
                       f"{_f(cmp_['goodput']['ratio'])}×")
    auto = arms.get(AUTOSCALED)
    if auto:
        out += ["", "### The autoscaler's decisions (autoscaled arm, first scale)", "",
                "| t (s) | action | pools (P, D) after | why |", "|---|---|---|---|"]
        for d in auto.get("decisions", []):
            out.append(f"| {d['t']:.1f} | {d['action']} | {tuple(d['targets'])} | {d['reason'][:160]} |")
        lat = auto.get("latencies", {})
        out += ["", f"Fresh worker starts (Ray placement + model load): {_stat_line(lat.get('start_s'))}; "
                    f"in-place role switches: {_stat_line(lat.get('switch_s'))}; decision → pools serving at the "
                    f"new target: {_stat_line(lat.get('decision_to_serving_s'))}."]
    return "\n".join(out) + "\n"


def _stat_line(xs: Sequence[float] | None) -> str:
    if not xs:
        return "none"
    return f"{len(xs)}× — " + ", ".join(f"{x:.1f}" for x in xs) + " s"


# --------------------------------------------------------------------- plot
def write_plot(result: dict, path: str | Path) -> Path:
    """Attainment over time (per arm, first scale) above the workers each arm held, decisions marked.
    The PNG's metadata carries :func:`figures_digest` of ``result``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    phases = [Phase(**p) for p in s["phases"]]
    key = f"{s['scales'][0]:g}"
    arms = {a: v for a, v in result["arms"].items() if key in v["runs"]}
    colors = dict(zip(arms, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for ax in (ax1, ax2):
        for p, t in zip(phases, phase_starts(phases)):
            ax.axvline(t, color="grey", linewidth=0.8, linestyle=":")
    for p, t in zip(phases, phase_starts(phases)):
        ax1.text(t + 1, 1.04, p.label, fontsize=8, color="dimgrey")
    for a, v in arms.items():
        run = v["runs"][key]
        xs = [t + s["window_s"] / 2 for t, att, _ in run["over_time"] if att is not None]
        ys = [att for _, att, _ in run["over_time"] if att is not None]
        ax1.plot(xs, ys, "o-", color=colors[a], label=f"{a}: {_f(run['attainment']['all'], '%')} overall, "
                                                       f"{_f(run['met_per_worker_second'], '.3f')} met/worker-s")
        samples = v.get("samples", {}).get(key, [])
        if samples:
            ts = [x[0] for x in samples] + [run["span_s"]]
            ws = [x[1] for x in samples] + [samples[-1][1]]
            ax2.step(ts, ws, where="post", color=colors[a], label=f"{a}: {run['worker_seconds']:.0f} worker-s")
    short = {"scale_up": "+", "scale_down": "−", "rebalance": "⇄"}
    for d in (arms.get(AUTOSCALED) or {}).get("decisions", []):
        total = d["targets"][0] + d["targets"][1]
        ax2.annotate(f"{short.get(d['action'], '?')} {d['targets'][0]}:{d['targets'][1]}", (d["t"], total + 0.15),
                     fontsize=7, color=colors.get(AUTOSCALED, "k"), ha="center")
    ax1.axhline(0.9, color="k", linestyle="--", linewidth=1, label="90 % (DistServe's attainment target)")
    ax1.set_ylim(-0.02, 1.12)
    ax1.set_ylabel(f"SLO attainment per {s['window_s']:g} s window\n(by send time)")
    ax1.legend(fontsize=8, loc="lower left")
    ax1.grid(True, alpha=0.3)
    ax2.set_ylabel("workers holding CPUs\n(decisions: + up, − down, ⇄ switch; P:D)")
    ax2.set_xlabel("time since the trace started (s)")
    ax2.set_ylim(0, s["autoscale"]["max_total"] + 1)
    ax2.legend(fontsize=8, loc="upper left")
    ax2.grid(True, alpha=0.3)
    fig.suptitle("benchmarks.autoscale: autoscaled vs static, rate × " + key, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={PLOT_HASH_KEY: figures_digest(result)})
    plt.close(fig)
    return path


def plot_digest(path: str | Path) -> str | None:
    """The figures digest a PNG written by :func:`write_plot` carries (``None`` if none)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.info.get(PLOT_HASH_KEY)
