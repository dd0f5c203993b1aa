"""The planner's discrete-event simulation and search, on small cases (torch- and Ray-free)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from analysis.bottleneck import PRESETS
from analysis.hardware import PROFILES
from analysis.plan import plan
from analysis.serving_sim import SLO, StepCosts, Workload, simulate

DIMS = PRESETS["llama-3.1-8b"][0]


def costs(**kw) -> StepCosts:
    return StepCosts(DIMS, PROFILES["H100"], "bf16", 1, **kw)


def test_one_request_takes_exactly_its_steps():
    c = costs()
    wl = Workload(rate=1.0, input_len=(500, 500), output_len=(2, 2), requests=1)
    r = simulate(c, wl, SLO(10, 10), 1, 1)
    # Alone: TTFT = one prefill step + the KV transfer; one decode step makes the second token.
    assert r.ttft_s[0] == pytest.approx(c.prefill_s([500]) + c.transfer_s(500))
    assert r.tpot_s[0] == pytest.approx(c.decode_s(1, 500))
    assert r.attainment == 1.0


def test_more_load_than_a_pool_can_take_misses_the_slo():
    c = costs()
    wl = Workload(rate=60.0, input_len=(1000, 2000), output_len=(64, 128), requests=1500)
    slo = SLO(ttft_s=1.0, tpot_s=0.05)
    small, big = simulate(c, wl, slo, 1, 1), simulate(c, wl, slo, 12, 12)
    assert small.ttft_attainment < 0.5 < big.ttft_attainment
    assert big.attainment > small.attainment


def test_the_plan_meets_the_slo_and_is_minimal():
    c = costs()
    wl = Workload(rate=40.0, input_len=(500, 1500), output_len=(32, 128), requests=1200)
    slo = SLO(ttft_s=1.0, tpot_s=0.03)
    p = plan(c, wl, slo)
    r = p.result
    assert r.attainment >= 0.9 and p.devices == r.prefill + r.decode
    # One prefill worker fewer (decode ample) misses TTFT; one decode worker fewer (prefill ample) misses.
    if r.prefill > 1:
        assert simulate(c, wl, slo, r.prefill - 1, r.decode * 3).ttft_attainment < 0.9
    if r.decode > 1:
        assert simulate(c, wl, slo, r.prefill * 3, r.decode - 1).attainment < 0.9


def test_cli_runs_torch_free_under_both_names():
    code = ("import sys; from analysis.plan import main; main(['--model', 'llama-3.1-8b', '--rate', '5', "
            "'--requests', '200']); assert 'torch' not in sys.modules and 'ray' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "cheapest: prefill:decode" in out.stdout
    helped = subprocess.run([sys.executable, "-m", "cluster.plan", "--help"], capture_output=True, text=True,
                            timeout=120, check=True)
    assert "--rate" in helped.stdout
