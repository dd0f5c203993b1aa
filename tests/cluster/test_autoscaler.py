"""The autoscaling loop against a scripted pool (no Ray): worker statuses in, targets and role
switches out; a scale-up whose workers never come is reported and never blocks the loop."""

from __future__ import annotations

import asyncio

from cluster.autoscale_policy import CounterDeltas, REBALANCE, SCALE_DOWN, SCALE_UP
from cluster.autoscaler import Autoscaler, build_signals
from cluster.config import AutoscaleConfig
from engine.step_stats import StepStatsSnapshot
from worker_common.worker_status import KVTransferStats, WorkerStatus

MAX_RUNNING = 8


def status(wid: str, kind: str, *, busy_s: float = 0.0, served: int = 0, outstanding: int = 0, used: int = 0,
           running: int = 0, latencies=()) -> WorkerStatus:
    return WorkerStatus(worker_id=wid, kind=kind, running=running, waiting=0, reserved=0,
                        outstanding_tokens=outstanding, free_blocks=100 - used, used_blocks=used, num_blocks=100,
                        requests_served=served, preemptions=0, step_stats=StepStatsSnapshot(busy_seconds=busy_s),
                        kv_transfer=KVTransferStats(), recent_latencies=tuple(latencies))


class FakePools:
    """Pools whose workers report a scripted decode load; starts either come at once or never."""

    def __init__(self, counts, starts_come: bool = True) -> None:
        self.targets = counts
        self.live = list(counts)
        self.starts_come = starts_come
        self.decode_used = 0  # KV blocks used per decode worker
        self.switches: list[tuple[str, str]] = []
        self.t = 0.0

    async def worker_statuses(self):
        out = [status(f"p{i}", "prefill", busy_s=self.t * 0.1) for i in range(self.live[0])]
        out += [status(f"d{i}", "decode", used=self.decode_used, busy_s=self.t) for i in range(self.live[1])]
        return out

    def pool_targets(self):
        return self.targets

    def pending_starts(self):
        return sum(max(t - n, 0) for t, n in zip(self.targets, self.live))

    async def set_pool_targets(self, counts):
        self.targets = counts
        if self.starts_come:
            self.live = list(counts)
        else:  # Ray never places the new workers; the drains still happen
            self.live = [min(n, t) for n, t in zip(self.live, counts)]

    async def switch_worker_role(self, frm, to):
        self.switches.append((frm, to))
        i, j = ("prefill", "decode").index(frm), ("prefill", "decode").index(to)
        self.live[i] -= 1
        self.live[j] += 1
        t = list(self.targets)
        t[i] -= 1
        t[j] += 1
        self.targets = tuple(t)
        return 0.25

    def can_switch_roles(self):
        return True


def run(cfg: AutoscaleConfig, pools: FakePools, loads: list[int]) -> list:
    """One tick per entry of ``loads`` (decode KV blocks used per worker), 5 s apart."""
    scaler = Autoscaler(cfg, pools, MAX_RUNNING, clock=lambda: pools.t)

    async def go():
        out = []
        for used in loads:
            pools.decode_used = used
            out.append(await scaler.tick())
            await asyncio.sleep(0)  # let a switch task run
            pools.t += 5.0
        return out, scaler.report()

    return asyncio.run(go())


CFG = dict(min_total=2, max_total=4, interval_s=5, scale_up_window_s=10, scale_down_window_s=20, cooldown_s=10,
           prefill_queue_tokens=1000)


def test_scales_decode_up_under_kv_pressure_and_down_when_idle():
    pools = FakePools((1, 1))
    decisions, report = run(AutoscaleConfig(**CFG), pools, [95] * 6 + [0] * 10)
    assert decisions[0] is None  # the first observation is the counters' baseline
    acted = [(d.action, d.target) for d in decisions if d is not None and d.changes]
    assert acted[0] == (SCALE_UP, (1, 2)) and (SCALE_DOWN, (1, 1)) in acted
    assert pools.targets == (1, 1)
    assert dict(report.decisions)[SCALE_UP] >= 1 and report.last_decision_at > 0


def test_a_scale_up_that_never_comes_is_reported_and_does_not_block():
    pools = FakePools((1, 1), starts_come=False)
    decisions, report = run(AutoscaleConfig(**CFG), pools, [95] * 12)
    ups = [d for d in decisions if d is not None and d.action == SCALE_UP]
    assert ups and pools.targets[1] > pools.live[1]
    assert report.pending == pools.targets[1] - pools.live[1] and report.live == (1, 1)
    assert len([d for d in decisions if d is not None]) == 11  # every tick decided: nothing waited
    assert "pending" in decisions[-1].reason and decisions[-1].action == "hold"  # reported, asked for again


def test_at_the_cap_a_worker_switches_role():
    pools = FakePools((2, 2))
    decisions, report = run(AutoscaleConfig(**CFG), pools, [95] * 7)
    assert pools.switches == [("prefill", "decode")]  # prefill idle (no queue, little busy), decode hot
    assert any(d is not None and d.action == REBALANCE for d in decisions)
    assert report.role_switches == 1 and report.last_switch_s == 0.25 and pools.targets == (1, 3)


def test_advisory_changes_nothing():
    pools = FakePools((1, 1))
    decisions, report = run(AutoscaleConfig(**CFG, advisory=True), pools, [95] * 6)
    assert any(d is not None and d.action == SCALE_UP and not d.apply for d in decisions)
    assert pools.targets == (1, 1) and report.advisory


def test_build_signals_counts_each_latency_sample_once():
    deltas, seen = CounterDeltas(), {}
    a = [status("d0", "decode", busy_s=1.0, served=2, latencies=[(10.0, 0.05)])]
    s0 = build_signals(0.0, 5.0, a, MAX_RUNNING, deltas, seen)
    assert s0.decode.tpot_s == () and s0.decode.requests == 0  # baseline
    b = [status("d0", "decode", busy_s=3.0, served=5, latencies=[(10.0, 0.05), (12.0, 0.5)])]
    s1 = build_signals(5.0, 5.0, b, MAX_RUNNING, deltas, seen)
    assert s1.decode.tpot_s == (0.5,) and s1.decode.requests == 3 and s1.decode.busy_s == 2.0
    assert s1.decode.max_running == MAX_RUNNING and s1.prefill.workers == 0
    assert build_signals(10.0, 5.0, b, MAX_RUNNING, deltas, seen).decode.tpot_s == ()
