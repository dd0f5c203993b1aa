"""The engine benchmark's report on hand-made measurements: rooflines, targets, contention, text (no model)."""

from __future__ import annotations

import pytest

from benchmarks.engine_report import (CONTENTION_WARN_CORES, contention_warning, finish_roofline,
                                      mark_decode_targets, render, roofline)

# 10 GB/s and 100 GFLOP/s: ridge point 10 FLOP/byte (bfloat16 matmuls: 400 GFLOP/s).
PEAKS = {"bandwidth_gbps": 10.0, "matmul_gflops": 100.0, "matmul_bf16_gflops": 400.0}


def test_roofline_by_hand():
    # 1e9 bytes (0.1 s at 10 GB/s) and 1e9 FLOPs (0.01 s at 100 GFLOP/s), measured 0.2 s: bandwidth-bound.
    r = roofline(1e9, 1e9, 0.2, PEAKS)
    assert r["bound"] == "bandwidth"
    assert r["roofline_ms"] == pytest.approx(100.0)
    assert r["fraction_of_roofline"] == pytest.approx(0.5)
    assert r["fraction_of_bandwidth_roofline"] == pytest.approx(0.5)
    assert r["fraction_of_compute_roofline"] == pytest.approx(0.05)
    assert r["achieved_gbps"] == pytest.approx(5.0) and r["achieved_gflops"] == pytest.approx(5.0)
    assert roofline(1e8, 1e11, 2.0, PEAKS)["bound"] == "compute"   # 1000 FLOP/byte, above the ridge


def test_a_bfloat16_formats_compute_fraction_is_against_the_bfloat16_peak():
    # 4e10 FLOPs in 1 s: 40 % of the float32 peak, 10 % of the bfloat16 one.
    assert roofline(1e6, 4e10, 1.0, PEAKS)["fraction_of_compute_roofline"] == pytest.approx(0.4)
    r = roofline(1e6, 4e10, 1.0, PEAKS, "bfloat16")
    assert r["fraction_of_compute_roofline"] == pytest.approx(0.1) and r["compute_dtype"] == "bfloat16"
    assert r["roofline_ms"] == pytest.approx(100.0)  # 4e10 FLOPs at 400 GFLOP/s


def decode_entry(batch: int, nbytes: float, flops: float, seconds: float, others: float | None = 0.0) -> dict:
    return {"batch": batch, "context": 260.0, "ms_per_step": 1e3 * seconds, "tokens_per_s": batch / seconds,
            "other_cpu_cores": others, "_cost": (nbytes, flops, seconds)}


def fake_result(others: float = 0.0) -> dict:
    decode = [decode_entry(1, 1e9, 1e9, 0.125), decode_entry(8, 1e9, 8e9, 0.2),
              decode_entry(64, 1e9, 64e9, 1.0, others)]
    prefill = [{"batch": 1, "prompt_len": 512, "reps": 2, "ms": 500.0, "ms_min": 490.0, "tokens_per_s": 1024.0,
                "other_cpu_cores": 0.0, "_cost": (1e9, 50e9, 0.5)}]
    finish_roofline(decode, PEAKS)
    finish_roofline(prefill, PEAKS)
    mark_decode_targets(decode)
    sample = {"bandwidth_gbps": 10.0, "matmul_gflops": 100.0, "other_cpu_cores": 0.0}
    machine = {**PEAKS, "samples": [sample, sample], "cpu_count": 2, "torch_version": "x", "torch_threads": 2,
               "other_cpu_cores": 0.1,
               "model": {"name": "m", "num_params": 135e6, "param_bytes": 540e6, "kv_bytes_per_token": 46080}}
    mixed = {"n_requests": 4, "seed": 0, "prompt_len_range": [32, 512], "output_len_range": [16, 256],
             "batch_size": 2, "ratio": 3.5, "target_ratio": 3.0, "meets_target": True,
             "engine": {"wall_s": 1.0, "useful_tokens": 100, "tokens_per_s": 100.0, "other_cpu_cores": 0.0,
                        "steps": 60, "preemptions": 0},
             "generate": {"wall_s": 3.5, "useful_tokens": 100, "tokens_per_s": 28.6, "other_cpu_cores": 0.0,
                          "generated_tokens": 150, "wasted_fraction": 1 / 3}}
    return {"machine": machine, "decode": decode, "prefill": prefill, "mixed": mixed}


def test_targets_are_marked_on_batch_1_and_64_only():
    decode = fake_result()["decode"]
    b1, b8, b64 = decode
    assert "_cost" not in b1
    # batch 1: 0.1 s of bandwidth roofline in 0.125 s = 80% >= 70%
    assert b1["target"] == {"metric": "fraction_of_bandwidth_roofline", "threshold": 0.70, "met": True}
    assert "target" not in b8
    # batch 64: 0.64 s of compute roofline in 1 s = 64% >= 50%
    assert b64["target"]["metric"] == "fraction_of_compute_roofline" and b64["target"]["met"]


def test_render_and_contention_warning():
    quiet = fake_result()
    text = render(quiet)
    for needle in ("Decode (prompt 256 tokens", "Prefill (512-token prompts", "bw >= 70%: met",
                   "compute >= 50%: met", "engine / generate() = 3.50x (target >= 3x: met)"):
        assert needle in text, needle
    assert contention_warning(quiet) is None
    busy = fake_result(others=CONTENTION_WARN_CORES + 1)
    assert "WARNING: other processes used up to 1.25 of 2 cores" in contention_warning(busy)
    assert "WARNING" in render(busy)


def test_formats_table_reads_each_formats_own_bytes():
    result = fake_result()
    decode = [decode_entry(1, 2.5e8, 1e9, 0.05), decode_entry(64, 2.5e8, 64e9, 1.0)]
    prefill = [{"batch": 1, "prompt_len": 512, "reps": 2, "ms": 250.0, "ms_min": 240.0, "tokens_per_s": 2048.0,
                "other_cpu_cores": 0.0, "_cost": (2.5e8, 50e9, 0.25)}]
    finish_roofline(decode, PEAKS, "bfloat16")
    finish_roofline(prefill, PEAKS, "bfloat16")
    mark_decode_targets(decode)
    result["formats"] = [{"format": "int8/bfloat16", "model": {"weight_bytes_read": 2.5e8}, "decode": decode,
                          "prefill": prefill, "mixed_ratio_vs_generate": 4.0, "meets_mixed_target": True,
                          "mixed_engine": {"tokens_per_s": 114.4, "other_cpu_cores": 0.0}}]
    result["resident_mb"] = {"float32": 900.0, "int8/bfloat16": 420.0}
    text = render(result)
    row = next(line for line in text.splitlines() if line.lstrip().startswith("int8/bfloat16"))
    # 0.025 s of bandwidth roofline (2.5e8 B at 10 GB/s) in 0.05 s = 50%; 64e9 FLOPs at the bf16 peak
    # (400 GFLOP/s) in 1 s = 16%; the prefill's 50e9 FLOPs in 0.25 s = 50%.
    for cell in ("250", "420", "50.0", "50%", "16%", "2048", "114.4", "4.00x"):
        assert cell in row.split(), (cell, row)
    assert "float32" in text and "900" in text


def test_a_run_without_the_mixed_workload_renders():
    result = fake_result()
    result["mixed"] = None
    assert "Mixed workload: not run (--skip-mixed)" in render(result)
