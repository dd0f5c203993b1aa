"""splitserve against its peers: a table and a plot from one side-by-side run's JSON lines.

    python -m benchmarks.peers_report docs/peers/peers.jsonl --plot docs/peers/peers.png

The input holds one JSON object per system, measured one system at a time on
the same machine by one client on one workload (raw 128-token prompts,
exactly 64 output tokens, greedy): ``label``, ``latency`` and
``throughput_c8`` (each with ``ttft_ms_p50``, ``tpot_ms_p50``,
``out_tok_s``), ``busy_cores``. The client is not part of this repository;
any tool that writes these fields will do (``benchmarks.serve`` measures the
same figures for splitserve alone). Ratios are against the first line
(splitserve).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PeerRun:
    """One system's figures from the side-by-side run."""

    label: str
    ttft_ms: float        # batch 1, p50
    tpot_ms: float        # batch 1, p50
    streams_tok_s: float  # output tokens/s with 8 requests in flight
    busy_cores: float

    @classmethod
    def of(cls, line: dict) -> "PeerRun":
        return cls(line["label"], line["latency"]["ttft_ms_p50"], line["latency"]["tpot_ms_p50"],
                   line["throughput_c8"]["out_tok_s"], line.get("busy_cores", float("nan")))


def read_runs(path: str | Path) -> list[PeerRun]:
    """Every system of a JSON-lines file, in file order."""
    return [PeerRun.of(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def table(runs: list[PeerRun]) -> str:
    """A Markdown table, each peer's figures with splitserve's ratio to it."""
    ours = runs[0]
    rows = ["| system | TTFT b1 p50 | TPOT b1 p50 | 8 streams, tok/s | splitserve TTFT / TPOT / tok/s vs it |",
            "|---|---|---|---|---|"]
    for r in runs:
        ratio = ("" if r is ours else f"{ours.ttft_ms / r.ttft_ms:.2f}x / {ours.tpot_ms / r.tpot_ms:.2f}x / "
                 f"{ours.streams_tok_s / r.streams_tok_s:.2f}x")
        rows.append(f"| {r.label} | {r.ttft_ms:.0f} ms | {r.tpot_ms:.1f} ms | {r.streams_tok_s:.0f} | {ratio} |")
    return "\n".join(rows)


def plot(runs: list[PeerRun], out: str | Path) -> Path:
    """Three bar panels (TTFT, TPOT: lower is better; tok/s: higher is better) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (("TTFT, batch 1 (ms, lower is better)", [r.ttft_ms for r in runs]),
              ("TPOT, batch 1 (ms, lower is better)", [r.tpot_ms for r in runs]),
              ("output tok/s, 8 in flight (higher is better)", [r.streams_tok_s for r in runs]))
    labels = [r.label for r in runs]
    colors = ["tab:blue"] + ["tab:gray"] * (len(runs) - 1)
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(range(len(runs)), values, color=colors)
        ax.bar_label(bars, fmt="%.0f" if max(values) >= 50 else "%.1f")
        ax.set_xticks(range(len(runs)), labels, rotation=15, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.15)  # room for the bar labels
    fig.suptitle("splitserve (make run) vs peers, same 2-core CPU, one client, one run", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("jsonl", help="one JSON object per system, splitserve first")
    parser.add_argument("--plot", help="write the PNG here")
    args = parser.parse_args(argv)
    runs = read_runs(args.jsonl)
    print(table(runs))
    if args.plot:
        print(f"plot: {plot(runs, args.plot)}")


if __name__ == "__main__":
    main()
