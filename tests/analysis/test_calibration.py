"""analysis.calibration: measured step costs for the planner's simulation, and the planner calibrated with them."""

from __future__ import annotations

import json
import math

import pytest

from analysis import calibration as cal
from analysis import plan
from analysis.serving_sim import SLO, Workload, simulate

ENGINE = {"machine": {"torch_threads": 1, "model": {"name": "builtin:smollm2-135m-instruct"}},
          "decode": [{"batch": b, "ms_per_step": ms} for b, ms in ((1, 60.0), (8, 88.0), (32, 184.0))],
          "prefill": [{"batch": 1, "prompt_len": 512, "ms": 900.0}, {"batch": 4, "prompt_len": 512, "ms": 3300.0}]}
OVERHEAD = {"transfer": {"backends": {"gloo/processes": {
                "128": {"tokens": 128, "ms": 10.0}, "512": {"tokens": 512, "ms": 22.0},
                "2048": {"tokens": 2048, "ms": 70.0}}}},
            "cluster": {"ttft_overhead_ms": 15.0, "server": {"transfer_ms": 6.0}}}


def test_fit_and_interpolate():
    assert cal.fit_line([(1, 3), (3, 7), (5, 11)]) == pytest.approx((1.0, 2.0))
    assert cal.fit_line([(4, 8)]) == (0.0, 2.0)
    pts = [(1, 60.0), (8, 88.0), (32, 184.0)]
    assert cal.interpolate(pts, 1) == 60.0 and cal.interpolate(pts, 4.5) == pytest.approx(74.0)
    assert cal.interpolate(pts, 20) == pytest.approx(136.0)
    assert cal.interpolate(pts, 64) == pytest.approx(184.0 + 4 * 32)  # the last segment's slope, extended
    assert cal.relative_error(1.2, 1.0) == pytest.approx(0.2) and math.isnan(cal.relative_error(1.0, 0.0))


def test_costs_from_benchmark_json():
    c = cal.from_benchmarks(ENGINE)
    # Prefill: the line through (512 tokens, 0.9 s) and (2048, 3.3 s).
    assert c.prefill_line == pytest.approx((0.1, 2.4 / 1536))
    assert c.prefill_s([256, 256]) == pytest.approx(0.9)
    assert c.decode_s(8, 300.0) == pytest.approx(0.088) and c.decode_s(20, 300.0) == pytest.approx(0.136)
    assert c.transfer_line == cal.DEFAULT_TRANSFER
    assert c.max_batch(256, 64) == 32 and c.max_batch(256, 16) == 16
    t = cal.from_benchmarks(ENGINE, OVERHEAD)
    a, b = cal.fit_line([(128, 0.010), (512, 0.022), (2048, 0.070)])
    assert t.transfer_line == pytest.approx((a + 0.009, b))  # + the path outside the transfer (15 - 6 ms)
    with pytest.raises(ValueError):
        cal.from_benchmarks({"decode": [], "prefill": []})


def test_calibrated_simulation_slows_down_with_rate():
    c = cal.from_benchmarks(ENGINE)
    slo = SLO(2.0, 0.15)
    low, high = (simulate(c, Workload(r, (128, 384), (16, 48), requests=300), slo, 1, 1, max_running=32)
                 for r in (0.3, 1.6))
    assert low.ttft_s[1] < high.ttft_s[1] and low.attainment > high.attainment
    # An unloaded request's TTFT is its prefill plus the transfer path.
    assert low.ttft_s[0] == pytest.approx(c.prefill_s([256]) + c.transfer_s(256), rel=0.4)


def test_plan_cli_calibrated(tmp_path, capsys):
    (tmp_path / "engine.json").write_text(json.dumps(ENGINE))
    (tmp_path / "overhead.json").write_text(json.dumps(OVERHEAD))
    assert plan.main(["--engine-json", str(tmp_path / "engine.json"), "--overhead-json",
                      str(tmp_path / "overhead.json"), "--rate", "3", "--input-len", "128:384", "--output-len",
                      "16:48", "--ttft", "2", "--tpot", "0.15", "--max-running", "32", "--requests", "300"]) == 0
    out = capsys.readouterr().out
    assert "measured costs (engine.json)" in out and "builtin:smollm2-135m-instruct on measured worker" in out
    assert "cheapest: prefill:decode = " in out
