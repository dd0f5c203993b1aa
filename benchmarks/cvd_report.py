"""Analysis, Markdown report and plots of ``benchmarks.colocated_vs_disaggregated``.

Kept apart from the runner so that each module has one job: this one turns
per-arm request records into figures, tables and PNGs (and is unit-tested
without a cluster); the runner starts the arms and drives the trace. The
trace shape and the arms are constants here because both sides need them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.slo import SLO, RequestRecord, meets_slo, stats, summarize

MAX_MODEL_LEN = 2048
SHORT_INPUT, SHORT_OUTPUT = 32, 48
LONG_INPUT, LONG_OUTPUT = (768, 1024), 4
REPLICAS = 2
WORKER_CPUS = 1.0          # per worker actor: one torch thread each, 2 cores' worth per arm
# Generous: a short prompt queued behind long ones at a busy prefill worker must not lose its
# decode reservation (lease) or its expected transfer (timeout) and be retried; that would be
# the retry path under test, not interference.
LEASE_S = 120.0
TRANSFER_TIMEOUT_S = 120.0
DEFAULT_CHUNK_TOKENS = 128
REQUEST_TIMEOUT_S = 300.0
NAMESPACE = "bench-colocated-vs-disaggregated"

ARMS = ("colocated", "disaggregated", "chunked", "conditional")
ARM_TITLES = {"colocated": "(a) colocated", "disaggregated": "(b) disaggregated 1:1",
              "chunked": "(c) colocated + chunked prefill",
              "conditional": "(d) disaggregated 1:1 + prefix_aware + conditional"}
#: Arm (d): a prompt this short (uncached on its decode worker) is prefilled there, no transfer.
CONDITIONAL_TOKENS = 64
BASE_ARM = "colocated"

SLO_SHORT = SLO(ttft_ms=1000.0, tpot_ms=200.0)   # a chat answer: first token within 1 s, 5 tokens/s after
SLO_LONG = SLO(ttft_ms=8000.0, tpot_ms=500.0)    # a long document: a 1k-token prefill may take a few seconds here


# ------------------------------------------------------------------ analysis
def long_windows(records: Sequence[RequestRecord]) -> list[tuple[float, float]]:
    """(send, end) of every long request: while it is in flight a short request's decode may be disturbed."""
    return sorted((r.start_s, r.end_s) for r in records
                  if r.kind == "long" and r.start_s is not None and r.end_s is not None)


def split_itls(records: Sequence[RequestRecord], windows: Sequence[tuple[float, float]]
               ) -> tuple[list[float], list[float], list[tuple[float, float, bool]]]:
    """ITL gaps (ms) of ok short requests: those overlapping a window, the others, and
    ``(gap end s, gap ms, overlaps)`` points for a timeline."""
    during: list[float] = []
    quiet: list[float] = []
    points: list[tuple[float, float, bool]] = []
    for r in records:
        if r.kind != "short" or not r.ok:
            continue
        t = r.token_times_s
        for a, b in zip(t, t[1:]):
            hit = any(a < we and b > ws for ws, we in windows)
            gap = (b - a) * 1000.0
            (during if hit else quiet).append(gap)
            points.append((b, gap, hit))
    return during, quiet, points


def attainment_by_kind(records: Sequence[RequestRecord], slos: dict[str, SLO]) -> dict[str, float]:
    """Fraction of each kind's requests (and of all) meeting both limits of that kind's SLO."""
    out: dict[str, float] = {}
    met_all = 0
    for kind, slo in slos.items():
        rs = [r for r in records if r.kind == kind]
        met = sum(meets_slo(r, slo) for r in rs)
        met_all += met
        out[kind] = met / len(rs) if rs else math.nan
    out["all"] = met_all / len(records) if records else math.nan
    return out


RUN_TOTALS = ("num_requests", "num_ok", "errors", "duration_s", "request_throughput", "output_token_throughput",
              "output_tokens", "length_mismatches", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def analyze_run(records: Sequence[RequestRecord], slo_short: SLO = SLO_SHORT, slo_long: SLO = SLO_LONG) -> dict:
    """One mixed (or short-only) run's figures, per kind, with the short ITL split by long requests in flight."""
    everything = summarize(records, SLO())
    windows = long_windows(records)
    during, quiet, _ = split_itls(records, windows)
    out = {
        "all": {k: everything[k] for k in RUN_TOTALS},
        "short": summarize([r for r in records if r.kind == "short"], slo_short),
        "itl_short_during_long_ms": stats(during),
        "itl_short_quiet_ms": stats(quiet),
        "attainment": attainment_by_kind(records, {"short": slo_short, "long": slo_long}),
        "long_windows_s": windows,
    }
    longs = [r for r in records if r.kind == "long"]
    out["long"] = summarize(longs, slo_long) if longs else None
    return out


def ratio(x: float | None, base: float | None) -> float:
    if x is None or base is None or not math.isfinite(x) or not math.isfinite(base) or base == 0:
        return math.nan
    return x / base


# ------------------------------------------------------------------ markdown
Getter = Callable[[dict], Any]


def dig(d: Any, *path: Any) -> Any:
    """``d[path[0]][path[1]]...``, ``None`` where a step is missing."""
    for p in path:
        if d is None:
            return None
        try:
            d = d[p]
        except (KeyError, IndexError, TypeError):
            return None
    return d


def fmt_num(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if spec == "%":
        return f"{x:.0%}"
    return format(x, spec)


def fmt_ratio(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}×"


def _stat_rows(label: str, path: tuple, keys: Sequence[str] = ("p50", "p90", "p99", "max"),
               spec: str = ".0f") -> list[tuple[str, Getter, str]]:
    return [(f"{label} {k} (ms)", (lambda r, p=path, k=k: dig(r, *p, k)), spec) for k in keys]


def rate_rows() -> list[tuple[str, Getter, str]]:
    """The mixed run's table: (label, getter on one arm's run analysis, format)."""
    rows: list[tuple[str, Getter, str]] = [
        ("requests ok / sent", lambda r: f"{dig(r, 'all', 'num_ok')}/{dig(r, 'all', 'num_requests')}", "s"),
        ("errors", lambda r: ", ".join(f"{k} {v}" for k, v in (dig(r, "all", "errors") or {}).items()) or "0", "s"),
        ("throughput (req/s)", lambda r: dig(r, "all", "request_throughput"), ".2f"),
        ("output throughput (tok/s)", lambda r: dig(r, "all", "output_token_throughput"), ".1f"),
    ]
    rows += _stat_rows("**short ITL during long prefills**", ("itl_short_during_long_ms",))
    rows += [("short ITL gaps during long prefills (n)", lambda r: dig(r, "itl_short_during_long_ms", "n"), "d")]
    rows += _stat_rows("short ITL, quiet gaps", ("itl_short_quiet_ms",), ("p50", "p99"))
    rows += [("short ITL p99 during long / quiet p50",
              lambda r: ratio(dig(r, "itl_short_during_long_ms", "p99"), dig(r, "itl_short_quiet_ms", "p50")), ".1f")]
    rows += _stat_rows("short ITL, all gaps", ("short", "itl_ms"))
    rows += _stat_rows("short TTFT", ("short", "ttft_ms"))
    rows += _stat_rows("short TPOT", ("short", "tpot_ms"))
    rows += _stat_rows("short E2E", ("short", "e2e_ms"), ("p50", "p99"))
    rows += _stat_rows("long TTFT", ("long", "ttft_ms"), ("p50", "max"))
    rows += _stat_rows("long E2E", ("long", "e2e_ms"), ("p50", "max"))
    rows += [
        ("SLO attainment, short", lambda r: dig(r, "attainment", "short"), "%"),
        ("SLO attainment, long", lambda r: dig(r, "attainment", "long"), "%"),
        ("SLO attainment, all", lambda r: dig(r, "attainment", "all"), "%"),
        ("other processes' CPU (cores)", lambda r: dig(r, "env", "other_cores"), ".2f"),
        ("load average (1 min, max)", lambda r: dig(r, "env", "loadavg_1m"), ".1f"),
    ]
    return rows


def saturation_rows() -> list[tuple[str, Getter, str]]:
    return [
        ("output throughput (tok/s)", lambda r: dig(r, "output_token_throughput"), ".1f"),
        ("throughput (req/s)", lambda r: dig(r, "request_throughput"), ".2f"),
        ("TPOT p50 (ms)", lambda r: dig(r, "tpot_ms", "p50"), ".0f"),
        ("TTFT p50 (ms)", lambda r: dig(r, "ttft_ms", "p50"), ".0f"),
        ("other processes' CPU (cores)", lambda r: dig(r, "env", "other_cores"), ".2f"),
    ]


def reference_rows() -> list[tuple[str, Getter, str]]:
    return _stat_rows("short ITL, no long prompts", ("short", "itl_ms"), ("p50", "p90", "p99", "max")) + [
        ("short TTFT p50 (ms)", lambda r: dig(r, "short", "ttft_ms", "p50"), ".0f"),
        ("other processes' CPU (cores)", lambda r: dig(r, "env", "other_cores"), ".2f"),
    ]


# Rows whose ratio to the colocated arm is meaningless (counts, text, environment).
_NO_RATIO = ("requests ok", "errors", "(n)", "other processes", "load average", "SLO attainment")


def render_table(columns: Sequence[tuple[str, dict | None]], rows: Sequence[tuple[str, Getter, str]],
                 base: str | None = None) -> str:
    """A Markdown table: one row per metric, one column per arm, then each arm's ratio to ``base``."""
    names = [n for n, _ in columns]
    data = dict(columns)
    others = [n for n in names if base is not None and n != base and base in data]
    head = ["metric"] + [ARM_TITLES.get(n, n) for n in names] + [f"{n} ÷ {base}" for n in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, get, spec in rows:
        vals = [get(data[n]) if data[n] is not None else None for n in names]
        cells = [v if isinstance(v, str) else fmt_num(v, spec) for v in vals]
        for n in others:
            if any(s in label for s in _NO_RATIO) or data[n] is None or data[base] is None:
                cells.append("")
            else:
                v, b = get(data[n]), get(data[base])
                cells.append(fmt_ratio(ratio(v, b)) if not isinstance(v, str) else "")
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def headline(result: dict) -> list[str]:
    """The side-by-side ratios that answer the question, one line each."""
    out = []
    arms = result["arms"]
    for rate in result["settings"]["rates"]:
        key = rate_key(rate)
        runs = {a: dig(arms, a, "runs", key) for a in arms}
        base = runs.get(BASE_ARM)
        for arm, run in runs.items():
            if arm == BASE_ARM or run is None or base is None:
                continue
            parts = []
            for label, path in (("short ITL p99 during long prefills", ("itl_short_during_long_ms", "p99")),
                                ("max", ("itl_short_during_long_ms", "max")),
                                ("short ITL p50", ("short", "itl_ms", "p50")),
                                ("short TTFT p99", ("short", "ttft_ms", "p99")),
                                ("long TTFT p50", ("long", "ttft_ms", "p50"))):
                parts.append(f"{label} {fmt_ratio(ratio(dig(run, *path), dig(base, *path)))}")
            out.append(f"- {rate:g} short req/s, {ARM_TITLES[arm]} vs {ARM_TITLES[BASE_ARM]}: " + "; ".join(parts))
    sat = {a: dig(arms, a, "saturation") for a in arms}
    if sat.get(BASE_ARM):
        for arm, s in sat.items():
            if arm != BASE_ARM and s:
                r = ratio(s["output_token_throughput"], sat[BASE_ARM]["output_token_throughput"])
                out.append(f"- saturation output tokens/s, {ARM_TITLES[arm]} vs {ARM_TITLES[BASE_ARM]}: {fmt_ratio(r)}")
    return out


def rate_key(rate: float) -> str:
    return f"{rate:g}"


def render_markdown(result: dict) -> str:
    """The whole report: settings, one table per rate, saturation, reference, goodput, headline ratios."""
    s, m, arms = result["settings"], result["machine"], result["arms"]
    names = list(arms)
    out = [
        "## Colocated vs disaggregated (one run)",
        "",
        f"Model {result['model']}, float32, CPU; every arm: 2 worker actors × num_cpus {WORKER_CPUS:g} "
        f"(torch threads per worker: {m.get('worker_torch_threads')}), total CPUs "
        + ", ".join(f"{a} {result['configs'][a]['total_cpus']:g}" for a in names)
        + f"; chunked prefill budget {s['chunk_tokens']} tokens.",
        f"Trace: Poisson short requests ({SHORT_INPUT} in / {SHORT_OUTPUT} out) over {s['duration_s']:g} s "
        f"(× {s['rounds']} rounds per rate, arms interleaved) plus one "
        f"long prompt ({LONG_INPUT[0]}-{LONG_INPUT[1]} in / {LONG_OUTPUT} out) every {s['long_every_s']:g} s from "
        f"{s['long_first_s']:g} s; seed {s['seed']}. SLO short: TTFT ≤ {s['slo_short']['ttft_ms']:g} ms, TPOT ≤ "
        f"{s['slo_short']['tpot_ms']:g} ms; long: TTFT ≤ {s['slo_long']['ttft_ms']:g} ms, TPOT ≤ "
        f"{s['slo_long']['tpot_ms']:g} ms.",
        f"Machine: {m.get('cpu_count')} CPUs, busy {m.get('busy_cores_before_run')} cores before the run, "
        f"load average {m.get('loadavg_before_run')} before; wall {m.get('wall_s')} s.",
    ]
    for rate in s["rates"]:
        key = rate_key(rate)
        n_long = len(dig(result, "trace", key, "long_times_s") or [])
        n_short = len(dig(result, "trace", key, "short_times_s") or [])
        out += ["", f"### {rate:g} short req/s + 1 long every {s['long_every_s']:g} s "
                    f"({n_short} short, {n_long} long per round)", ""]
        out.append(render_table([(a, dig(arms, a, "runs", key)) for a in names], rate_rows(), BASE_ARM))
    out += ["", f"### Saturation: closed loop, {s['saturation_concurrency']} short requests in flight, "
                f"{s['saturation_requests']} in all", ""]
    out.append(render_table([(a, dig(arms, a, "saturation")) for a in names], saturation_rows(), BASE_ARM))
    refs = [(a, dig(arms, a, "reference")) for a in names if dig(arms, a, "reference")]
    if refs:
        out += ["", f"### Undisturbed decode step: the short requests alone ({s['reference_s']:g} s at "
                    f"{s['rates'][0]:g} req/s, no long prompts)", ""]
        out.append(render_table(refs, reference_rows()))
    gp = result.get("goodput")
    if gp:
        out += ["", "### Goodput (DistServe, ≥ 90 % of all requests meet their kind's SLO; offered total rate)", ""]
        for a, g in gp.items():
            out.append(f"- {ARM_TITLES.get(a, a)}: {g['rate']:.2f} req/s ({g['note']})")
    out += ["", "### Side-by-side ratios (this run)", ""] + headline(result)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, xs: Sequence[float], **kw) -> None:
    xs = sorted(xs)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", **kw)


def write_plots(result: dict, records: dict[str, dict[str, list[RequestRecord]]], out_dir: str | Path) -> list[Path]:
    """``itl_cdf.png``, ``ttft_cdf.png``, ``timeline_<rate>.png`` and the library's ``latency_cdf.png``."""
    from benchmarks.plots import plot_latency_cdfs

    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rates = [rate_key(r) for r in result["settings"]["rates"]]
    arms = list(records)
    colors = {a: c for a, c in zip(ARMS, ("tab:red", "tab:blue", "tab:green", "tab:purple"))}
    written = []

    fig, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 4.5), squeeze=False)
    for ax, key in zip(axes[0], rates):
        for arm in arms:
            recs = records[arm].get(key, [])
            during, quiet, _ = split_itls(recs, long_windows(recs))
            _cdf(ax, during + quiet, color=colors[arm], label=f"{ARM_TITLES[arm]}: all")
            _cdf(ax, during, color=colors[arm], linestyle="--", label=f"{ARM_TITLES[arm]}: during long")
        ax.set_xscale("log")
        ax.set_title(f"short-request ITL CDF, {key} short req/s")
        ax.set_xlabel("ITL (ms, log)")
        ax.set_ylabel("fraction of gaps")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(out / "itl_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(rates), 2, figsize=(12, 4.2 * len(rates)), squeeze=False)
    for row, key in zip(axes, rates):
        for ax, kind in zip(row, ("short", "long")):
            for arm in arms:
                recs = [r for r in records[arm].get(key, []) if r.kind == kind and r.ok and r.ttft_s is not None]
                _cdf(ax, [r.ttft_s * 1000.0 for r in recs], color=colors[arm], label=ARM_TITLES[arm], marker=".")
            limit = result["settings"][f"slo_{kind}"]["ttft_ms"]
            ax.axvline(limit, color="k", linestyle="--", linewidth=1, label=f"SLO {limit:g} ms")
            ax.set_title(f"TTFT CDF, {kind} requests, {key} short req/s")
            ax.set_xlabel("TTFT (ms)")
            ax.set_ylabel("fraction of requests")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(out / "ttft_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    undisturbed = next((dig(r, "reference", "short", "itl_ms", "p50") for r in result["arms"].values()
                        if dig(r, "reference")), None)
    for key in rates:
        fig, axes = plt.subplots(len(arms), 1, figsize=(12, 2.8 * len(arms)), sharex=True, sharey=True, squeeze=False)
        for ax, arm in zip(axes[:, 0], arms):
            recs = records[arm].get(key, [])
            longs = [r for r in recs if r.kind == "long" and r.start_s is not None and r.end_s is not None]
            for i, r in enumerate(longs):
                first = r.token_times_s[0] if r.token_times_s else r.end_s
                ax.axvspan(r.start_s, first, color="orange", alpha=0.35,
                           label="long prompt: send to first token" if i == 0 else None)
                ax.axvspan(first, r.end_s, color="gold", alpha=0.2,
                           label="long: first to last token" if i == 0 else None)
                ax.axvline(r.start_s, color="darkorange", linewidth=1)
            _, _, pts = split_itls(recs, long_windows(recs))
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, color=colors[arm], label="short-request ITL")
            for off in (dig(result, "arms", arm, "runs", key, "round_offsets_s") or [])[1:]:
                ax.axvline(off, color="grey", linewidth=1.5, linestyle="-.")
            ref = dig(result, "arms", arm, "runs", key, "itl_short_quiet_ms", "p50")
            if ref is not None and math.isfinite(ref):
                ax.axhline(ref, color="k", linestyle=":", linewidth=1, label=f"this arm's quiet p50 {ref:.0f} ms")
            if undisturbed is not None and math.isfinite(undisturbed):
                ax.axhline(undisturbed, color="grey", linestyle="--", linewidth=1,
                           label=f"short-only run p50 {undisturbed:.0f} ms")
            ax.set_yscale("log")
            ax.set_ylabel("ITL (ms, log)")
            ax.set_title(f"{ARM_TITLES[arm]}, {key} short req/s", fontsize=9)
            ax.grid(True, alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper right")
        axes[-1, 0].set_xlabel("time since the trace started (s); a dot is one gap between two tokens of a short "
                               "request, at the later token")
        fig.tight_layout()
        written.append(out / f"timeline_{key}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    runs = [(f"{ARM_TITLES[a]} @ {k}", records[a][k]) for k in rates for a in arms if k in records[a]]
    written.append(plot_latency_cdfs(runs, SLO(**result["settings"]["slo_short"]), out / "latency_cdf.png"))
    return written
