"""The pure parts of benchmarks.plan_validation: measured figures from a serve run, the prediction, the errors."""

from __future__ import annotations

import pytest

from analysis.calibration import from_benchmarks
from benchmarks import plan_validation as pv
from tests.analysis.test_calibration import ENGINE


def test_measured_figures_and_errors():
    recs = [{"ok": True, "ttft_ms": 100.0 * (i + 1), "tpot_ms": 50.0 + i} for i in range(11)]
    recs.append({"ok": False, "ttft_ms": None, "tpot_ms": None})
    m = pv.measured_figures({"records": recs, "summary": {"attainment": {"both": 0.75}}})
    assert m.ttft_s == pytest.approx((0.6, 1.0, 1.09)) and m.tpot_s[0] == pytest.approx(0.055)
    p = pv.Figures((0.66, 0.9, 1.09), (0.055, 0.06, 0.06), 0.8)
    e = pv.compare(m, p)
    assert e["ttft_p50"] == pytest.approx(0.1) and e["ttft_p90"] == pytest.approx(-0.1) and e["ttft_p99"] == 0
    assert e["attainment_points"] == pytest.approx(5.0)
    row = {"rate": 1.0, "measured": m.__dict__, "predicted": p.__dict__, "errors": e}
    md = pv.render([row], from_benchmarks(ENGINE), {"loadavg_before": [1, 1, 1], "loadavg_after": [2, 2, 2],
                                                     "wall_s": 1.0})
    assert "| 1 | TTFT p50 (s) | 0.6 | 0.66 | +10% |" in md and "| 1 | SLO attainment | 75% | 80% | +5 points |" in md


def test_prediction_pools_replays_and_degrades_with_rate():
    c = from_benchmarks(ENGINE)
    lo, hi = pv.predict(c, 0.3, seeds=5), pv.predict(c, 2.0, seeds=5)
    assert lo.ttft_s[2] < hi.ttft_s[2] and lo.attainment >= hi.attainment
    assert pv.predict(c, 0.3, seeds=5) == lo  # seeded


def test_fit_factor_bisects_an_increasing_figure():
    assert pv.fit_factor(9.0, lambda k: k * k) == pytest.approx(3.0, rel=1e-3)
    assert pv.fit_factor(0.001, lambda k: k) == 0.25 and pv.fit_factor(100.0, lambda k: k) == 8.0


def test_contention_factors_reproduce_the_fitted_rate():
    c = from_benchmarks(ENGINE)
    # "Measured" = the simulation with decode 1.8x and prefill 1.3x slower: the fit recovers both.
    truth = pv.predict(c.scaled(1.8, 1.3), 0.5, seeds=pv.SIM_SEEDS // 4)
    dec, pre = pv.contention_factors(c, 0.5, truth)
    assert dec == pytest.approx(1.8, rel=0.08) and pre == pytest.approx(1.3, rel=0.15)
    assert c.scaled(2.0, 1.0).decode_s(8, 0) == pytest.approx(2 * c.decode_s(8, 0))
    assert c.scaled(1.0, 3.0).prefill_s([512]) == pytest.approx(3 * c.prefill_s([512]))
