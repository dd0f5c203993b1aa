"""The autoscaling loop that runs inside the pool manager (``pools.autoscale``).

Every ``interval_s``: read every live worker's status (the same
:class:`~worker_common.worker_status.WorkerStatus` the router polls), turn the
cumulative counters into this interval's increments, build the per-role
:class:`~cluster.autoscale_policy.Signals`, let
:func:`~cluster.autoscale_policy.decide` choose, and carry the decision out
through the pool manager's own machinery:

- scale up / down: new pool targets; the pool manager starts the missing
  workers in the background (each asks Ray for its resources, so on a real
  cluster the Ray autoscaler or KubeRay adds nodes) and drains the extra ones
  (out of the routing table, killed once idle). A start that Ray cannot place
  stays pending and is reported (``pending``); one that fails is retried with
  the pool manager's backoff. Nothing here waits for it.
- rebalance: one worker moves from a pool to the other. With role switching
  it is drained and switches role in place (:mod:`cluster.role_worker`),
  keeping its weights; without, it is drained and killed and a fresh one of
  the other kind starts.

Decisions are logged and kept in an :class:`~observability.autoscale.AutoscaleReport`
that the routing table carries to the router, which exposes it as metrics.
In advisory mode nothing is carried out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from cluster.autoscale_policy import (ACTIONS, REBALANCE, ROLES, CounterDeltas, Decision, DecodeSignals,
                                      PolicyState, PrefillSignals, Signals, decide)
from observability.autoscale import AutoscaleReport
from worker_common.worker_status import WorkerStatus

if TYPE_CHECKING:
    from cluster.config import AutoscaleConfig

log = logging.getLogger(__name__)
STATUS_TIMEOUT_S = 5.0
HISTORY = 200  # decisions kept for the report and the benchmarks


class PoolControl(Protocol):
    """What the loop needs of the pool manager (:class:`cluster.pool_manager.PoolManager`)."""

    async def worker_statuses(self) -> list[WorkerStatus]:
        """The status of every live, non-draining worker (those that answered in time)."""

    def pool_targets(self) -> tuple[int, int]:
        """(prefill, decode) the pools are being moved to."""

    def pending_starts(self) -> int:
        """Worker starts under way (Ray placing them, or the model loading)."""

    async def set_pool_targets(self, counts: tuple[int, int]) -> None:
        """Move the pools to ``counts``; starts and drains run in the background."""

    async def switch_worker_role(self, frm: str, to: str) -> float:
        """Drain one ``frm`` worker and switch it to ``to`` in place; the switch's seconds."""

    def can_switch_roles(self) -> bool:
        """Whether this deployment's workers switch role in place."""


def build_signals(t: float, interval_s: float, statuses: Iterable[WorkerStatus], max_running: int,
                  deltas: CounterDeltas, seen: dict[str, float]) -> Signals:
    """The per-role signals of one observation. ``deltas`` turns each worker's busy seconds and
    finished requests into this interval's increments; ``seen`` (worker -> the newest latency
    sample already counted) keeps each latency sample to one interval. Both are updated."""
    roles: dict[str, dict] = {r: {"workers": 0, "busy": 0.0, "requests": 0, "lat": []} for r in ROLES}
    queued = used = blocks = running = 0
    keys = set()
    for s in statuses:
        if s.kind not in roles:
            continue
        r = roles[s.kind]
        key = f"{s.worker_id}/{s.kind}"  # a switched worker starts afresh under its new kind
        keys.add(key)
        busy, served = deltas.step(key, (s.step_stats.busy_seconds, float(s.requests_served)))
        r["workers"] += 1
        r["busy"] += busy
        r["requests"] += int(served)
        newest = seen.get(key)
        r["lat"] += [sec for at, sec in s.recent_latencies if newest is not None and at > newest]
        seen[key] = max([at for at, _ in s.recent_latencies] + [newest or 0.0])
        if s.kind == "prefill":
            queued += s.outstanding_tokens
        else:
            used += s.used_blocks
            blocks += s.num_blocks
            running += s.running + s.reserved + s.waiting
    deltas.forget_except(keys)
    for k in [k for k in seen if k not in keys]:
        del seen[k]
    p, d = roles["prefill"], roles["decode"]
    return Signals(t, interval_s,
                   PrefillSignals(p["workers"], queued, tuple(p["lat"]), p["busy"], p["requests"]),
                   DecodeSignals(d["workers"], used, blocks, running, max_running * d["workers"], tuple(d["lat"]),
                                 d["busy"], d["requests"]))


class Autoscaler:
    """The loop; :meth:`run` forever, or :meth:`tick` once (tests, benchmarks)."""

    def __init__(self, cfg: AutoscaleConfig, pools: PoolControl, max_running: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.pools = pools
        self.max_running = max_running  # one decode worker's pools.decode.max_running
        self.clock = clock
        self.state = PolicyState()
        self.history: collections.deque[Decision] = collections.deque(maxlen=HISTORY)
        self.counts = {a: 0 for a in ACTIONS}
        self.capped = 0
        self.role_switches = 0
        self.switch_failures = 0
        self.last_switch_s: float | None = None
        self.last_start_s: float | None = None  # set by the pool manager when a fresh worker is up
        self._deltas = CounterDeltas()
        self._seen: dict[str, float] = {}
        self._last_t: float | None = None
        self._live = (0, 0)
        self._switch: asyncio.Task | None = None
        self._last_wall = 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("autoscaler tick failed; trying again next interval")

    async def tick(self) -> Decision | None:
        """Observe, decide, carry out (in the background). ``None``: nothing to decide on yet
        (the first observation only sets the counters' baseline; a pool with no live worker)."""
        statuses = await self.pools.worker_statuses()
        t = self.clock()
        interval = self.cfg.interval_s if self._last_t is None else t - self._last_t
        first = self._last_t is None
        self._last_t = t
        signals = build_signals(t, interval, statuses, self.max_running, self._deltas, self._seen)
        self._live = (signals.prefill.workers, signals.decode.workers)
        if first or not all(self._live):
            return None
        if self._switch is not None and not self._switch.done():
            return None  # a role switch is under way: its pools are in motion
        decision, self.state = decide(self.cfg, self.state, signals, self.pools.pool_targets(),
                                      self.pools.pending_starts())
        self._record(decision)
        if decision.changes and decision.apply:
            await self._carry_out(decision)
        return decision

    def _record(self, d: Decision) -> None:
        self.history.append(d)
        self.counts[d.action] += 1
        self._last_wall = time.time()
        if d.capped:
            self.capped += 1
        if d.changes:
            verb = "advises" if not d.apply else "decides"
            log.info("autoscaler %s %s: %s -> %s (%s)", verb, d.action, d.counts, d.target, d.reason)

    async def _carry_out(self, d: Decision) -> None:
        if d.action == REBALANCE and d.switch is not None and self.cfg.role_switch and self.pools.can_switch_roles():
            frm, to = d.switch
            self._switch = asyncio.get_running_loop().create_task(self._switch_role(frm, to))
        else:
            await self.pools.set_pool_targets(d.target)

    async def _switch_role(self, frm: str, to: str) -> None:
        try:
            self.last_switch_s = await self.pools.switch_worker_role(frm, to)
            self.role_switches += 1
            log.info("a %s worker switched to %s in %.2f s", frm, to, self.last_switch_s)
        except Exception:
            self.switch_failures += 1
            log.exception("switching a %s worker to %s failed; the pool manager replaces it", frm, to)

    def report(self) -> AutoscaleReport:
        last = self.history[-1] if self.history else None
        ttft = tpot = None
        if last is not None:
            ttft, tpot = last.loads[0].attainment, last.loads[1].attainment
        return AutoscaleReport(
            advisory=self.cfg.advisory, decisions=tuple(self.counts.items()),
            last_action=last.action if last else "none", last_reason=last.reason if last else "",
            last_decision_at=self._last_wall, targets=self.pools.pool_targets(), live=self._live,
            pending=self.pools.pending_starts(), capped=self.capped, role_switches=self.role_switches,
            switch_failures=self.switch_failures, last_switch_s=self.last_switch_s, last_start_s=self.last_start_s,
            prefill_share=last.ratio if last else None, ttft_attainment=ttft, tpot_attainment=tpot)

    def stop(self) -> None:
        if self._switch is not None:
            self._switch.cancel()
