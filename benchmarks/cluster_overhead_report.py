"""Figures and report of ``benchmarks.cluster_overhead``: timings, medians, ratios, targets, tables.

Kept apart from the runner (which starts Ray, the deployment and the
transports and times them) so that each module has one job: this one turns
token arrival times and transfer timings into TTFT / TPOT, medians, the
targets' verdicts and the text report, without torch or Ray. The KV shape
and the targets are constants here because both sides need them.
"""

from __future__ import annotations

import statistics
from typing import Any

KV_TOKENS = (128, 512, 2048)
KV_LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M: [layers, 2, T, kv_heads, head_dim]

TARGET_TPOT_RATIO = 1.15        # cluster TPOT / engine TPOT
TARGET_TTFT_SLACK_MS = 15.0     # cluster TTFT - (engine TTFT + transfer_ms)
TARGET_MEMCPY_FRACTION = 0.50   # fastest on-node backend / memcpy bandwidth (issue 12: >= 50 %)
BUSY_WARN_CORES = 0.25

Events = list[tuple[float, int]]  # (time a response/step arrived, tokens it carried)

SERVER_FIELDS = ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms", "prefill_ms", "transfer_ms", "transfer_bytes")
# other_ms: the router's TTFT less queue, prefill and transfer (tokenization, RPC hops, event loops)
SUMMARY_FIELDS = SERVER_FIELDS + ("other_ms",)


def median(xs: list[float]) -> float:
    """The median, NaN for no values."""
    return float(statistics.median(xs)) if xs else float("nan")


# ---------------------------------------------------------------- one request
def stream_timing(t0: float, events: Events) -> dict[str, Any]:
    """TTFT and TPOT (ms) of one request from the arrival times of its tokens."""
    if not events:
        return {"ttft_ms": float("nan"), "tpot_ms": float("nan"), "tokens": 0}
    (t_first, n_first), t_last = events[0], events[-1][0]
    total = sum(n for _, n in events)
    later = total - n_first
    gaps = [(b[0] - a[0]) * 1e3 for a, b in zip(events, events[1:])]
    return {"ttft_ms": (t_first - t0) * 1e3, "tpot_ms": (t_last - t_first) * 1e3 / later if later else float("nan"),
            "tokens": total, "max_gap_ms": max(gaps) if gaps else 0.0}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and means) of TTFT and TPOT over ``runs``; the router's timings' medians when it has them."""
    out: dict[str, Any] = {
        "ttft_ms": median([r["ttft_ms"] for r in runs]),
        "tpot_ms": median([r["tpot_ms"] for r in runs]),
        "ttft_ms_mean": statistics.fmean(r["ttft_ms"] for r in runs),
        "tpot_ms_mean": statistics.fmean(r["tpot_ms"] for r in runs),
        "n": len(runs),
    }
    if runs and "server" in runs[0]:
        out["server"] = {k: median([float(r["server"].get(k, float("nan"))) for r in runs]) for k in SUMMARY_FIELDS}
    return out


def judge_paths(eng: dict[str, Any], clu: dict[str, Any]) -> dict[str, Any]:
    """Ratios and the issue's two targets (medians)."""
    transfer = clu["server"]["transfer_ms"]
    ttft_bound = eng["ttft_ms"] + transfer + TARGET_TTFT_SLACK_MS
    tpot_ratio = clu["tpot_ms"] / eng["tpot_ms"]
    return {
        "ratios": {"ttft": clu["ttft_ms"] / eng["ttft_ms"], "tpot": tpot_ratio},
        "ttft_overhead_ms": clu["ttft_ms"] - eng["ttft_ms"],
        "targets": {
            "tpot": {"ratio": tpot_ratio, "target": TARGET_TPOT_RATIO, "met": tpot_ratio <= TARGET_TPOT_RATIO},
            "ttft": {"cluster_ms": clu["ttft_ms"], "bound_ms": ttft_bound, "engine_ms": eng["ttft_ms"],
                     "transfer_ms": transfer, "slack_ms": TARGET_TTFT_SLACK_MS, "met": clu["ttft_ms"] <= ttft_bound},
        },
    }


# -------------------------------------------------------------- KV transfers
def kv_shape(tokens: int) -> tuple[int, ...]:
    return (KV_LAYERS, 2, tokens, KV_HEADS, HEAD_DIM)


def kv_nbytes(tokens: int) -> int:
    return tokens * KV_LAYERS * 2 * KV_HEADS * HEAD_DIM * 4


def best_memcpy(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """Per size and kind, the faster of two memcpy samplings (the stricter reference)."""
    out = {}
    for tokens in KV_TOKENS:
        x, y = a[tokens], b[tokens]
        out[tokens] = {"tokens": tokens, "bytes": x["bytes"]}
        for kind in ("", "first_touch_"):
            best = min(x, y, key=lambda m: m[f"{kind}ms"])
            out[tokens].update({f"{kind}ms": best[f"{kind}ms"], f"{kind}gbps": best[f"{kind}gbps"]})
        out[tokens]["samplings_ms"] = [x["ms"], y["ms"]]
    return out


def judge_transfers(results: dict[str, Any], memcpy: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Per size, the fastest cross-process backend (and in-process, for reference) vs the target."""
    per_size = {}
    for tokens in KV_TOKENS:
        entry = {}
        for kind in ("processes", "threads"):
            cands = [(name, r[str(tokens)]["fraction_of_memcpy"]) for name, r in results.items()
                     if name.endswith(kind) and not name.startswith("inproc") and "error" not in r]
            if cands:
                name, frac = max(cands, key=lambda c: c[1])
                entry[kind] = {"backend": name, "fraction_of_memcpy": frac, "met": frac >= TARGET_MEMCPY_FRACTION,
                               "fraction_of_first_touch_memcpy":
                                   results[name][str(tokens)]["fraction_of_first_touch_memcpy"]}
        per_size[str(tokens)] = entry
    met = all(e.get("processes", {}).get("met", False) for e in per_size.values())
    return {"fraction": TARGET_MEMCPY_FRACTION, "judged_on": "processes", "per_size": per_size, "met": met}


# --------------------------------------------------------------------- report
def fmt_ok(met: bool) -> str:
    return "met" if met else "NOT met"


def render_paths(engine: dict[str, Any], cluster: dict[str, Any]) -> str:
    """Section 1 as text: the engine in-process and the cluster side by side, against the targets."""
    m, s = engine["matched"], cluster["server"]
    lines = [f"\n== Engine in-process vs cluster: {len(engine['prompts'])} prompts, "
             f"{engine['max_tokens']} tokens, greedy, one at a time (medians of {m['n']}) ==",
             f"{'path':<40} {'TTFT ms':>9} {'TPOT ms':>9}",
             f"{'engine in-process, ' + str(engine['torch_threads']) + ' torch thread(s)':<40} "
             f"{m['ttft_ms']:9.1f} {m['tpot_ms']:9.2f}"]
    if "default_threads" in engine:
        d = engine["default_threads"]
        lines.append(f"{'engine in-process, ' + str(engine['default_torch_threads']) + ' torch threads':<40} "
                     f"{d['ttft_ms']:9.1f} {d['tpot_ms']:9.2f}")
    r, t = cluster["ratios"], cluster["targets"]
    lines += [
        f"{'cluster (client-side)':<40} {cluster['ttft_ms']:9.1f} {cluster['tpot_ms']:9.2f}",
        f"{'cluster (router-side timings)':<40} {s['ttft_ms']:9.1f} {s['tpot_ms']:9.2f}",
        f"  router breakdown: queue/reserve {s['queue_ms']:.1f} ms, prefill {s['prefill_ms']:.1f} ms, "
        f"transfer {s['transfer_ms']:.1f} ms ({s['transfer_bytes'] / 1e6:.2f} MB), "
        f"other {s['other_ms']:.1f} ms (medians of each)",
        f"  cluster / engine: TTFT {r['ttft']:.2f}x (+{cluster['ttft_overhead_ms']:.1f} ms), "
        f"TPOT {r['tpot']:.3f}x; same tokens {cluster['same_tokens_as_engine']}",
        f"  target TPOT <= {TARGET_TPOT_RATIO}x engine: {t['tpot']['ratio']:.3f}x -> {fmt_ok(t['tpot']['met'])}",
        f"  target TTFT <= engine {t['ttft']['engine_ms']:.1f} + transfer {t['ttft']['transfer_ms']:.1f} "
        f"+ {TARGET_TTFT_SLACK_MS:.0f} = {t['ttft']['bound_ms']:.1f} ms: {t['ttft']['cluster_ms']:.1f} ms "
        f"-> {fmt_ok(t['ttft']['met'])}",
    ]
    return "\n".join(lines)


def render_transfers(tr: dict[str, Any]) -> str:
    """Section 2 as text: every backend per KV size against memcpy, and the target."""
    lines = [f"\n== KV transfer, [30, 2, T, 3, 64] float32, chunk {tr['chunk_bytes'] >> 20} MiB "
             f"(median of {tr['reps']}; GB/s = payload bytes / time) ==",
             f"{'backend':<18}" + "".join(f"{str(t) + ' tok (' + format(kv_nbytes(t) / 1e6, '.1f') + ' MB)':>30}"
                                          for t in KV_TOKENS)]
    mc = tr["memcpy"]
    rows = [("memcpy", {k: {**v, "fraction_of_memcpy": 1.0} for k, v in mc.items()}),
            ("memcpy fresh dst", {k: {"ms": v["first_touch_ms"], "gbps": v["first_touch_gbps"],
                                      "fraction_of_memcpy": v["gbps"] and v["first_touch_gbps"] / v["gbps"]}
                                  for k, v in mc.items()})]
    rows += list(tr["backends"].items())
    for name, r in rows:
        if "error" in r:
            lines.append(f"{name:<18} error: {r['error']}")
            continue
        cells = [r[str(t)] for t in KV_TOKENS]
        lines.append(f"{name:<18}" + "".join(
            f"{c['ms']:>9.2f} ms {c['gbps']:>6.2f} GB/s {c['fraction_of_memcpy']:>4.0%}" for c in cells))
    for tokens, e in tr["target"]["per_size"].items():
        p = e.get("processes")
        if p:
            lines.append(f"  target >= {TARGET_MEMCPY_FRACTION:.0%} of memcpy at {tokens} tokens: fastest "
                         f"cross-process {p['backend']} {p['fraction_of_memcpy']:.0%} -> {fmt_ok(p['met'])} "
                         f"(vs a fresh-buffer copy: {p['fraction_of_first_touch_memcpy']:.0%})")
    return "\n".join(lines)


def render(engine: dict[str, Any], cluster: dict[str, Any], transfer: dict[str, Any]) -> str:
    """The whole report: both sections, and a warning when the machine was busy before the run."""
    out = [render_paths(engine, cluster), render_transfers(transfer)]
    busy = engine.get("machine", {}).get("busy_cores_before_run")
    if busy is not None and busy > BUSY_WARN_CORES:
        out.append(f"\nwarning: {busy} cores were busy with other work before the run; figures are noisy")
    return "\n".join(out)
