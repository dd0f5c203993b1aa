"""The cluster-overhead benchmark's figures and report on hand-made timings (no Ray, no model), and that
every benchmark report module imports without torch or Ray."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cluster_overhead_report import (KV_TOKENS, best_memcpy, judge_paths, judge_transfers, kv_nbytes,
                                                render, stream_timing, summarize)

REPO = Path(__file__).resolve().parents[2]


def test_stream_timing_by_hand():
    # Sent at 1.0 s; 2 tokens at 1.1 s, then 1 at 1.2 s and 1 at 1.4 s: TTFT 100 ms, 2 later tokens in 300 ms.
    t = stream_timing(1.0, [(1.1, 2), (1.2, 1), (1.4, 1)])
    assert t["ttft_ms"] == pytest.approx(100.0)
    assert t["tpot_ms"] == pytest.approx(150.0)
    assert t["tokens"] == 4 and t["max_gap_ms"] == pytest.approx(200.0)
    assert math.isnan(stream_timing(0.0, [])["ttft_ms"])


def server(transfer_ms: float) -> dict:
    return {"ttft_ms": 60.0, "tpot_ms": 21.0, "e2e_ms": 700.0, "queue_ms": 1.0, "prefill_ms": 40.0,
            "transfer_ms": transfer_ms, "transfer_bytes": 1e6, "other_ms": 14.0 - transfer_ms}


def paths() -> tuple[dict, dict]:
    eng_runs = [{"ttft_ms": 40.0, "tpot_ms": 20.0}, {"ttft_ms": 50.0, "tpot_ms": 22.0}]
    clu_runs = [{"ttft_ms": 60.0, "tpot_ms": 21.0, "server": server(4.0)},
                {"ttft_ms": 80.0, "tpot_ms": 23.0, "server": server(6.0)}]
    engine = {"torch_threads": 1, "default_torch_threads": 1, "max_tokens": 32, "prompts": ["a", "b"],
              "matched": summarize(eng_runs), "machine": {"busy_cores_before_run": 0.0}}
    cluster = {**summarize(clu_runs), "same_tokens_as_engine": "2/2"}
    cluster.update(judge_paths(engine["matched"], cluster))
    return engine, cluster


def test_summarize_and_judge_paths():
    engine, cluster = paths()
    assert engine["matched"]["ttft_ms"] == 45.0 and engine["matched"]["n"] == 2
    assert cluster["server"]["transfer_ms"] == 5.0          # median of the router's figures
    # TPOT 22 / 21 = 1.048 <= 1.15; TTFT 70 <= 45 + 5 + 15 = 65 is not met
    assert cluster["targets"]["tpot"]["met"]
    assert cluster["targets"]["ttft"]["bound_ms"] == 65.0 and not cluster["targets"]["ttft"]["met"]
    assert cluster["ttft_overhead_ms"] == 25.0


def memcpy(gbps: float) -> dict[int, dict[str, float]]:
    return {t: {"tokens": t, "bytes": kv_nbytes(t), "ms": kv_nbytes(t) / gbps / 1e6, "gbps": gbps,
                "first_touch_ms": 2 * kv_nbytes(t) / gbps / 1e6, "first_touch_gbps": gbps / 2} for t in KV_TOKENS}


def backend(fraction: float) -> dict:
    return {str(t): {"ms": 1.0, "gbps": 10.0 * fraction, "fraction_of_memcpy": fraction,
                     "fraction_of_first_touch_memcpy": 2 * fraction} for t in KV_TOKENS}


def test_best_memcpy_and_judge_transfers():
    best = best_memcpy(memcpy(5.0), memcpy(10.0))
    assert all(best[t]["gbps"] == 10.0 for t in KV_TOKENS)
    results = {"inproc/threads": backend(0.9), "gloo/threads": backend(0.5), "grpc/processes": backend(0.2),
               "shm/processes": backend(0.55), "ray/processes": {"error": "boom"}}
    verdict = judge_transfers(results, best)
    first = verdict["per_size"][str(KV_TOKENS[0])]
    assert first["processes"]["backend"] == "shm/processes" and first["processes"]["met"]   # 55% >= 50%
    assert first["threads"]["backend"] == "gloo/threads"      # inproc is never the candidate
    assert verdict["met"]
    assert not judge_transfers({"grpc/processes": backend(0.2)}, best)["met"]
    assert not judge_transfers({"gloo/processes": backend(0.45)}, best)["met"]  # 45% < 50%


def test_render_both_sections_and_the_busy_warning():
    engine, cluster = paths()
    results = {"gloo/processes": backend(0.35), "ray/processes": {"error": "boom"}}
    transfer = {"chunk_bytes": 4 << 20, "reps": 2, "memcpy": {str(k): v for k, v in memcpy(10.0).items()},
                "backends": results, "target": judge_transfers(results, memcpy(10.0))}
    text = render(engine, cluster, transfer)
    for needle in ("32 tokens, greedy", "target TPOT <= 1.15x engine: 1.048x -> met", "-> NOT met",
                   "ray/processes      error: boom", "fastest cross-process gloo/processes 35% -> NOT met"):
        assert needle in text, needle
    assert "warning" not in text
    engine["machine"]["busy_cores_before_run"] = 1.5
    assert "warning: 1.5 cores were busy" in render(engine, cluster, transfer)


def test_report_modules_import_without_torch_or_ray():
    reports = sorted(p.stem for p in (REPO / "benchmarks").glob("*_report.py"))
    assert {"cluster_overhead_report", "cvd_report", "engine_report", "soak_report"} <= set(reports)
    code = ("import importlib, sys\n"
            f"for m in {reports!r}: importlib.import_module('benchmarks.' + m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'engine', 'cluster'))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
