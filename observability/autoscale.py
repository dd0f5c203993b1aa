"""What the autoscaler reports: one frozen value the pool manager puts in its routing table,
the router's directory keeps, and :class:`observability.metrics.AutoscaleCollector` turns
into Prometheus series at scrape time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AutoscaleReport:
    """The autoscaler's state and its decisions so far (counters since the pool manager started)."""

    advisory: bool  # decisions are logged and exposed, never applied
    decisions: tuple[tuple[str, int], ...]  # (action, how many) for every action, hold included
    last_action: str  # the latest decision: hold | scale_up | scale_down | rebalance
    last_reason: str  # why, in words (the per-role figures behind it)
    last_decision_at: float  # time.time() of the latest decision; 0 before the first
    targets: tuple[int, int]  # (prefill, decode) the pools are being moved to
    live: tuple[int, int]  # (prefill, decode) workers serving now
    pending: int  # worker starts under way: Ray placing them (resources asked for) or loading the model
    capped: int  # decisions where a role needed more and max_total stopped it
    role_switches: int  # workers that switched role in place
    switch_failures: int  # switches that failed (the worker was replaced instead)
    last_switch_s: float | None  # seconds the latest in-place switch took (the worker's own call)
    last_start_s: float | None  # seconds the latest fresh worker start took (actor placed, model loaded)
    prefill_share: float | None  # the prefill share the split aims at; None: not measured yet (ratio auto)
    ttft_attainment: float | None  # share of recent requests within the TTFT target (prefill workers' part)
    tpot_attainment: float | None  # share of recent requests within the TPOT target
