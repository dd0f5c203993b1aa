"""The autoscaler's decisions over recorded signals: hysteresis, cooldown, ratio rounding, ratio auto,
rebalancing at the cap, advisory mode (pure functions, no Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.autoscale_policy import (HOLD, IDLE, PRESSURE, REBALANCE, SCALE_DOWN, SCALE_UP, STEADY, CounterDeltas,
                                      DecodeSignals, PolicyState, PrefillSignals, Signals, decide, decode_load,
                                      measured_split, prefill_load, split_total, WorkSample)
from cluster.config import AutoscaleConfig

INTERVAL = 5.0


def cfg(**kw) -> AutoscaleConfig:
    base = dict(min_total=2, max_total=8, interval_s=INTERVAL, scale_up_window_s=10, scale_down_window_s=30,
                cooldown_s=20, ratio_window_s=60)
    return AutoscaleConfig(**{**base, **kw})


def signals(t: float, counts: tuple[int, int], prefill: str = "steady", decode: str = "steady",
            prefill_work: float = 1.0, decode_work: float = 1.0, requests: int | None = None) -> Signals:
    """A recorded observation: each role at ``pressure``, ``steady`` or ``idle`` load, ``requests``
    finished in each pool (default 4, none when prefill is idle) and the pools' busy seconds per
    finished request (``*_work``, for ratio auto)."""
    p, d = counts
    if requests is None:
        requests = 0 if prefill == "idle" else 4
    queue = {"pressure": 5000 * p, "steady": 2000 * p, "idle": 0}[prefill]
    kv = {"pressure": 0.95, "steady": 0.5, "idle": 0.1}[decode]
    return Signals(
        t, INTERVAL,
        PrefillSignals(p, queue, ttft_s=(0.1,) * requests, busy_s=prefill_work * requests, requests=requests),
        DecodeSignals(d, kv_used_blocks=int(kv * 1000 * d), kv_blocks=1000 * d, running=int(kv * 64 * d),
                      max_running=64 * d, tpot_s=(0.01,) * requests, busy_s=decode_work * requests,
                      requests=requests))


def replay(config: AutoscaleConfig, counts: tuple[int, int], trace, t0: float = 0.0):
    """Feed ``trace`` (a list of (prefill state, decode state[, work kwargs])) one interval apart,
    applying every decision that changes something; return the decisions."""
    state, out = PolicyState(), []
    for i, step in enumerate(trace):
        p_state, d_state, *extra = step
        d, state = decide(config, state, signals(t0 + i * INTERVAL, counts, p_state, d_state, **(extra[0] if extra else {})),
                          counts)
        out.append(d)
        if d.changes and d.apply:
            counts = d.target
    return out


def test_role_loads_read_the_per_role_signals():
    c = cfg()
    assert prefill_load(PrefillSignals(2, 9000 * 2), INTERVAL, c).state == PRESSURE  # queue per worker over 4096
    assert prefill_load(PrefillSignals(2, 0, ttft_s=(0.1, 5.0, 5.0)), INTERVAL, c).state == PRESSURE  # 33% < 90%
    assert prefill_load(PrefillSignals(2, 0, busy_s=0.1), INTERVAL, c).state == IDLE
    assert prefill_load(PrefillSignals(2, 0, busy_s=5.0), INTERVAL, c).state == STEADY  # 50% busy
    assert decode_load(DecodeSignals(1, 900, 1000, 1, 64), c).state == PRESSURE  # KV 90%
    assert decode_load(DecodeSignals(1, 10, 1000, 60, 64), c).state == PRESSURE  # running 94%
    assert decode_load(DecodeSignals(1, 10, 1000, 1, 64, tpot_s=(0.5, 0.5, 0.01)), c).state == PRESSURE
    assert decode_load(DecodeSignals(1, 10, 1000, 1, 64, tpot_s=(0.01,)), c).state == IDLE
    assert decode_load(DecodeSignals(1, 500, 1000, 1, 64), c).state == STEADY


def test_hysteresis_needs_pressure_for_the_whole_window():
    # 10 s window at 5 s intervals: pressure seen at t=0, 5 is not yet held 10 s; at t=10 it is.
    d = replay(cfg(), (1, 1), [("steady", "pressure")] * 3)
    assert [x.action for x in d] == [HOLD, HOLD, SCALE_UP]
    assert d[-1].target == (1, 2)
    # One steady observation in between is tolerated (a batch's slots free for an instant) ...
    d = replay(cfg(), (1, 1), [("steady", "pressure"), ("steady", "steady"), ("steady", "pressure")])
    assert [x.action for x in d] == [HOLD, HOLD, SCALE_UP]
    # ... but not while it lasts (no change on a steady observation) nor two in a row (the window restarts).
    d = replay(cfg(), (1, 1), [("steady", "pressure"), ("steady", "pressure"), ("steady", "steady"),
                               ("steady", "steady"), ("steady", "pressure"), ("steady", "pressure"),
                               ("steady", "pressure")])
    assert [x.action for x in d] == [HOLD] * 6 + [SCALE_UP]
    # Idleness tolerates nothing: one steady observation restarts the scale-down window.
    d = replay(cfg(), (2, 2), [("idle", "idle")] * 3 + [("steady", "steady")] + [("idle", "idle")] * 7)
    assert [x.action for x in d] == [HOLD] * 10 + [SCALE_DOWN]
    # Nothing shrinks while a role is under pressure, even before its window is full.
    d = replay(cfg(scale_up_window_s=60), (2, 2), [("idle", "pressure")] * 10)
    assert all(x.action == HOLD for x in d)
    # Scale-down waits for its own (longer) window: idle from t=0, the 30 s are reached at t=30.
    d = replay(cfg(), (2, 2), [("idle", "idle")] * 7)
    assert [x.action for x in d] == [HOLD] * 6 + [SCALE_DOWN]


def test_cooldown_after_a_change_then_a_fresh_window():
    d = replay(cfg(), (1, 1), [("steady", "pressure")] * 12)
    actions = [x.action for x in d]
    # up at t=10; cooldown 20 s (t=15, 20, 25 hold: "cooldown"); the window restarts at the change,
    # so the pressure seen from t=15 must last 10 s (t=25), and the cooldown ends at t=30.
    assert actions[:2] == [HOLD, HOLD] and actions[2] == SCALE_UP
    assert all("cooldown" in x.reason for x in d[3:6])
    assert actions[6] == SCALE_UP and d[6].t == 30
    assert d[6].target == (1, 3)


def test_pending_starts_hold_growth_until_they_are_done():
    c, counts = cfg(), (1, 1)
    state = PolicyState()
    for i in range(3):
        d, state = decide(c, state, signals(i * INTERVAL, counts, "steady", "pressure"), counts, pending=1)
    assert d.action == HOLD and "1 worker start(s) pending" in d.reason
    # The pressure kept its timer: the first observation without a pending start acts at once.
    d, state = decide(c, state, signals(3 * INTERVAL, counts, "steady", "pressure"), counts, pending=0)
    assert d.action == SCALE_UP and d.target == (1, 2)


def test_min_and_max_total_bound_every_change():
    d = replay(cfg(max_total=3), (1, 1), [("pressure", "pressure")] * 20)
    assert max(sum(x.target) for x in d) == 3
    assert any(x.capped for x in d)
    d = replay(cfg(min_total=3), (2, 2), [("idle", "idle")] * 40)
    assert min(sum(x.target) for x in d) == 3


@pytest.mark.parametrize("ratio", ["2:1", "1:3", "3:2"])
def test_a_fixed_ratio_is_kept_within_rounding_on_every_change(ratio):
    c = cfg(ratio=ratio, max_total=12, min_total=2)
    p, q = c.fixed_ratio()
    share = p / (p + q)
    start = split_total(4, share)
    trace = [("pressure", "steady")] * 20 + [("steady", "pressure")] * 20 + [("idle", "idle")] * 60
    d = replay(c, start, trace)
    changes = [x for x in d if x.changes]
    assert {x.action for x in changes} == {SCALE_UP, SCALE_DOWN}
    for x in changes:
        n = sum(x.target)
        assert min(x.target) >= 1
        assert abs(x.target[0] - n * share) <= 0.5 or x.target[0] in (1, n - 1), (ratio, x.target)
        if x.action == SCALE_UP:  # the role under pressure gained
            hot = [ld.role for ld in x.loads if ld.state == PRESSURE]
            assert all(x.target[("prefill", "decode").index(r)] > x.counts[("prefill", "decode").index(r)] for r in hot)


def test_split_total_rounds_and_keeps_one_per_pool():
    assert split_total(5, 2 / 3) == (3, 2)
    assert split_total(3, 2 / 3) == (2, 1)
    assert split_total(2, 0.95) == (1, 1)
    assert split_total(8, 0.25) == (2, 6)
    with pytest.raises(ValueError):
        split_total(1, 0.5)


def test_ratio_auto_follows_the_measured_work_per_request():
    # Prefill costs 3 worker-seconds a request, decode 1: a prefill share of 3/4.
    work = dict(prefill_work=3.0, decode_work=1.0)
    d = replay(cfg(), (1, 1), [("pressure", "steady", work)] * 3)
    assert d[-1].action == SCALE_UP and d[-1].target == (2, 1)
    assert d[-1].ratio == pytest.approx(0.75)
    # The measurement says prefill, the signals say decode: the role under pressure still gains.
    d = replay(cfg(), (1, 1), [("steady", "pressure", work)] * 3)
    assert d[-1].target == (1, 2)
    # Scaling down from 2+2 with both idle takes from the pool the measurement says is too large.
    # (two requests an interval at 0.75 s of prefill each keep two prefill workers 15% busy: idle)
    d = replay(cfg(), (2, 2), [("idle", "idle", dict(prefill_work=0.75, decode_work=0.25, requests=2))] * 7)
    assert d[-1].action == SCALE_DOWN and d[-1].target == (2, 1)


def test_ratio_auto_at_the_cap_rebalances_by_switching_a_role():
    work = dict(prefill_work=3.0, decode_work=1.0)
    d = replay(cfg(max_total=4), (2, 2), [("pressure", "steady", work)] * 3)
    assert d[-1].action == REBALANCE and d[-1].target == (3, 1) and d[-1].switch == ("decode", "prefill")
    assert d[-1].capped
    # Without a measurement that decode has too many, and decode not idle, nothing moves: capped.
    d = replay(cfg(max_total=4), (2, 2), [("pressure", "steady")] * 3)
    assert d[-1].action == HOLD and d[-1].capped
    # A decode pool idle for its scale-down window (30 s) gives a worker even without a measurement.
    d = replay(cfg(max_total=4), (2, 2), [("pressure", "idle", dict(requests=0))] * 7)
    assert [x.action for x in d[:-1]] == [HOLD] * 6 and d[-1].action == REBALANCE and d[-1].switch == ("decode", "prefill")
    # A fixed ratio never rebalances.
    d = replay(cfg(max_total=3, ratio="1:2"), (1, 2), [("pressure", "idle")] * 3)
    assert d[-1].action == HOLD and d[-1].capped


def test_measured_split_needs_enough_requests_and_slides():
    assert measured_split((WorkSample(0, 1.0, 3, 1.0, 3),)) is None
    w = (WorkSample(0, 8.0, 4, 2.0, 4), WorkSample(5, 8.0, 4, 2.0, 4))
    assert measured_split(w).exact == pytest.approx(4.0)
    # Samples older than ratio_window_s leave the window: after the mix moves, so does the ratio.
    c = cfg(ratio_window_s=20)
    trace = [("steady", "steady", dict(prefill_work=3.0))] * 6 + [("steady", "steady", dict(decode_work=3.0))] * 6
    d = replay(c, (2, 2), trace)
    assert d[5].ratio == pytest.approx(0.75) and d[-1].ratio == pytest.approx(0.25)


def test_advisory_mode_decides_the_same_and_applies_nothing():
    trace = [("steady", "pressure")] * 4 + [("idle", "idle")] * 10
    live = replay(cfg(), (1, 1), trace)
    # Advisory: the counts never change, so replay it against fixed counts both ways.
    state_a, state_l, counts = PolicyState(), PolicyState(), (1, 1)
    for i, (p, dd) in enumerate(trace):
        s = signals(i * INTERVAL, counts, p, dd)
        a, state_a = decide(cfg(advisory=True), state_a, s, counts)
        x, state_l = decide(cfg(), state_l, s, counts)
        assert (a.action, a.target, a.reason) == (x.action, x.target, x.reason)
        assert a.apply is False and x.apply is True
    assert any(x.changes for x in live)


def test_counter_deltas_survive_new_and_restarted_workers():
    c = CounterDeltas()
    assert c.step("w1", (10.0, 3)) == (0.0, 0.0)  # first sight: its past is not this interval's
    assert c.step("w1", (12.5, 5)) == (2.5, 2)
    assert c.step("w1", (1.0, 1)) == (1.0, 1)  # restarted engine: counters went down
    c.forget_except({"w2"})
    assert c.last == {}


def test_the_decisions_import_neither_torch_nor_ray():
    code = ("import sys, cluster.autoscale_policy; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'torch or ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
