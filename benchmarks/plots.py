"""PNG figures of a serving sweep (matplotlib, Agg backend; ``pip install '.[bench]'``).

- ``latency_cdf.png``: empirical CDFs of TTFT, TPOT, ITL and E2E (ms), one
  line per run, the SLO limits as dashed lines.
- ``attainment.png``: SLO attainment (both, TTFT only, TPOT only) against the
  sweep variable, the attainment target and the goodput marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.slo import SLO, Goodput, RequestRecord

METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def latency_values(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """The ms values of ``metric`` (``ttft_ms``, ``tpot_ms``, ``itl_ms``, ``e2e_ms``) over ok records."""
    ok = [r for r in records if r.ok]
    if metric == "itl_ms":
        return [g * 1000.0 for r in ok for g in r.itls_s]
    attr = {"ttft_ms": "ttft_s", "tpot_ms": "tpot_s", "e2e_ms": "e2e_s"}[metric]
    return [getattr(r, attr) * 1000.0 for r in ok if getattr(r, attr) is not None]


def plot_latency_cdfs(runs: Sequence[tuple[str, Sequence[RequestRecord]]], slo: SLO, path: str | Path) -> Path:
    """One 2x2 figure of latency CDFs; ``runs`` are ``(label, records)``. Returns the file written."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (metric, name) in zip(axes.flat, METRICS):
        for label, records in runs:
            xs = sorted(latency_values(records, metric))
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
        limit = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}.get(metric)
        if limit is not None:
            ax.axvline(limit, color="k", linestyle="--", linewidth=1, label=f"SLO {limit:g} ms")
        ax.set_title(f"{name} CDF")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if metric != "itl_ms" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        axes.flat[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attainment(points: Sequence[tuple[float, dict]], good: Goodput | None, path: str | Path,
                    xlabel: str = "offered rate (req/s)") -> Path:
    """Attainment against the sweep variable; ``points`` are ``(x, attainment dict)``. Returns the file written."""
    plt = _pyplot()
    pts = sorted(points, key=lambda p: p[0])
    xs = [x for x, _ in pts]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style, label in (("both", "o-", "TTFT and TPOT"), ("ttft", "s--", "TTFT only"), ("tpot", "^--", "TPOT only")):
        ax.plot(xs, [a[key] for _, a in pts], style, label=label)
    if good is not None:
        ax.axhline(good.target, color="grey", linestyle=":", label=f"target {good.target:.0%}")
        if not good.none_met:
            tag = " (lower bound)" if good.lower_bound else ""
            ax.axvline(good.rate, color="k", linestyle="--", linewidth=1, label=f"goodput {good.rate:.3g}{tag}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(runs: Sequence[tuple[str, float, Sequence[RequestRecord], dict]], slo: SLO, good: Goodput | None,
             out_dir: str | Path, xlabel: str = "offered rate (req/s)") -> list[Path]:
    """Both figures into ``out_dir`` (created); ``runs`` are ``(label, x, records, attainment)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_latency_cdfs([(label, recs) for label, _, recs, _ in runs], slo, out / "latency_cdf.png"),
            plot_attainment([(x, att) for _, x, _, att in runs], good, out / "attainment.png", xlabel)]
