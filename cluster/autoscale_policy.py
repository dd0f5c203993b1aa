"""Autoscaling decisions as pure functions: signals in, a decision out (no Ray, no torch, no clock).

The loop (:mod:`cluster.autoscaler`) observes the pools every
``interval_s`` and calls :func:`decide` with what it saw and the state the
previous call returned; everything here is deterministic, so the tests
replay recorded signals.

**Per-role pressure** (:func:`role_load`). Prefill is under *pressure* when
its queued prompt tokens per worker exceed ``prefill_queue_tokens`` or the
share of its recent requests within ``ttft_s`` falls below ``attainment``;
it is *idle* when the queue, its busy fraction and its misses are all low.
Decode is under pressure when its KV-cache use or its running sequences
against ``max_running`` exceed ``high_load``, or its TPOT attainment falls
short; idle when both loads are below ``low_load`` and no target is missed.

**Hysteresis and cooldown.** A role must stay under pressure for
``scale_up_window_s`` (idle for ``scale_down_window_s``) before anything
moves. Pressure tolerates one observation without it (a closed batch frees
its slots for an instant before the next request takes them), idleness
none: adding is quick, removing is cautious. Nothing shrinks while any role
is under pressure (an idle worker is better moved to the busy pool than
removed). After a change the timers restart and nothing changes for
``cooldown_s``.

**The split.** A fixed ``"P:D"`` puts ``round(total * P / (P + D))`` workers
in prefill (at least one per pool) on every change, so the split is always
the ratio within rounding; scaling up for a role steps the total until that
role gains. ``auto`` splits at the measured work per request,
:class:`analysis.bottleneck.PhaseSplit` over the busy seconds and finished
requests of the last ``ratio_window_s`` (the same arithmetic as the
bottleneck report); the signals win where they disagree with it (a role
under pressure always gains). At ``max_total`` with ``auto``, a role under
pressure takes a worker from the other pool when that pool is idle or the
measured split says it has more than its share: a *rebalance*, which the
loop carries out by switching a drained worker's role in place.

**Advisory.** The decision is the same; it says ``apply=False`` and the loop
only logs and exposes it. Its timers and cooldown advance as if it had been
applied, so advisory mode reports what a live autoscaler would have done and
when.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from analysis.bottleneck import PhaseSplit

if TYPE_CHECKING:  # cluster.config pulls in torch (through kvtransfer); the decisions stay torch-free
    from cluster.config import AutoscaleConfig

ROLES = ("prefill", "decode")
PRESSURE, IDLE, STEADY = "pressure", "idle", "steady"
HOLD, SCALE_UP, SCALE_DOWN, REBALANCE = "hold", "scale_up", "scale_down", "rebalance"
ACTIONS = (HOLD, SCALE_UP, SCALE_DOWN, REBALANCE)
MIN_RATIO_REQUESTS = 8  # finished requests per pool in the window before ratio auto trusts the measurement


@dataclass(frozen=True)
class PrefillSignals:
    """The prefill pool over one observation interval (sums over its live workers)."""

    workers: int
    queued_prompt_tokens: int  # tokens of prompts accepted and not yet prefilled and pushed
    ttft_s: tuple[float, ...] = ()  # the worker-side TTFT of each request finished in the interval
    busy_s: float = 0.0  # engine busy seconds in the interval
    requests: int = 0  # requests finished in the interval


@dataclass(frozen=True)
class DecodeSignals:
    """The decode pool over one observation interval (sums over its live workers)."""

    workers: int
    kv_used_blocks: int
    kv_blocks: int
    running: int  # sequences running or holding a reservation
    max_running: int  # the pool's sum of max_running
    tpot_s: tuple[float, ...] = ()  # the TPOT of each request finished in the interval
    busy_s: float = 0.0
    requests: int = 0


@dataclass(frozen=True)
class Signals:
    """One observation: ``t`` (monotonic seconds) and the ``interval_s`` its increments cover."""

    t: float
    interval_s: float
    prefill: PrefillSignals
    decode: DecodeSignals


@dataclass(frozen=True)
class RoleLoad:
    """One role's verdict for one observation, with the figures behind it in words."""

    role: str
    state: str  # PRESSURE | IDLE | STEADY
    why: str
    attainment: float | None  # share of the interval's requests within target; None without requests


@dataclass(frozen=True)
class WorkSample:
    """Busy seconds and finished requests of each pool in one interval (for ratio auto)."""

    t: float
    prefill_busy_s: float
    prefill_requests: int
    decode_busy_s: float
    decode_requests: int


@dataclass(frozen=True)
class PolicyState:
    """What :func:`decide` remembers between calls. Start with ``PolicyState()``."""

    pressure_since: tuple[float | None, float | None] = (None, None)  # per role in ROLES order
    pressure_last: tuple[float | None, float | None] = (None, None)  # the latest observation under pressure
    idle_since: tuple[float | None, float | None] = (None, None)
    last_change_t: float | None = None
    work: tuple[WorkSample, ...] = ()


@dataclass(frozen=True)
class Decision:
    """What to do now. ``counts``/``target``: (prefill, decode) before and after.

    ``switch``: for a rebalance, ``(from_role, to_role)`` of the one worker
    that moves. ``capped``: a role needed more and ``max_total`` stopped it.
    ``apply``: False in advisory mode (log and expose only).
    """

    t: float
    action: str
    counts: tuple[int, int]
    target: tuple[int, int]
    reason: str
    loads: tuple[RoleLoad, RoleLoad]
    ratio: float | None = None  # the prefill share the split aimed at; None: no measurement yet (auto)
    switch: tuple[str, str] | None = None
    capped: bool = False
    apply: bool = True

    @property
    def changes(self) -> bool:
        return self.action != HOLD


# ------------------------------------------------------------------ signals
def attainment(samples: tuple[float, ...], target_s: float) -> float | None:
    """Share of ``samples`` at or under ``target_s``; ``None`` for no samples."""
    if not samples:
        return None
    return sum(s <= target_s for s in samples) / len(samples)


def _fmt_att(att: float | None) -> str:
    return "no requests" if att is None else f"{att:.0%}"


def prefill_load(s: PrefillSignals, interval_s: float, cfg: AutoscaleConfig) -> RoleLoad:
    """Prefill's verdict: queued prompt tokens per worker and TTFT attainment (busy fraction for idleness)."""
    n = max(s.workers, 1)
    queue = s.queued_prompt_tokens / n
    att = attainment(s.ttft_s, cfg.ttft_s)
    busy = s.busy_s / (interval_s * n) if interval_s > 0 else 0.0
    figures = f"queue {queue:.0f} tok/worker, TTFT<={cfg.ttft_s:g}s {_fmt_att(att)}, busy {busy:.0%}"
    if queue > cfg.prefill_queue_tokens:
        return RoleLoad("prefill", PRESSURE, f"{figures}: queue over {cfg.prefill_queue_tokens}", att)
    if att is not None and att < cfg.attainment:
        return RoleLoad("prefill", PRESSURE, f"{figures}: TTFT attainment under {cfg.attainment:.0%}", att)
    if queue <= cfg.low_load * cfg.prefill_queue_tokens and busy < cfg.low_load:
        return RoleLoad("prefill", IDLE, figures, att)
    return RoleLoad("prefill", STEADY, figures, att)


def decode_load(s: DecodeSignals, cfg: AutoscaleConfig) -> RoleLoad:
    """Decode's verdict: KV-cache use, running against max_running, TPOT attainment."""
    kv = s.kv_used_blocks / s.kv_blocks if s.kv_blocks else 0.0
    running = s.running / s.max_running if s.max_running else 0.0
    att = attainment(s.tpot_s, cfg.tpot_s)
    figures = f"KV {kv:.0%}, running {running:.0%} of max, TPOT<={cfg.tpot_s:g}s {_fmt_att(att)}"
    if max(kv, running) > cfg.high_load:
        return RoleLoad("decode", PRESSURE, f"{figures}: load over {cfg.high_load:.0%}", att)
    if att is not None and att < cfg.attainment:
        return RoleLoad("decode", PRESSURE, f"{figures}: TPOT attainment under {cfg.attainment:.0%}", att)
    if max(kv, running) < cfg.low_load:
        return RoleLoad("decode", IDLE, figures, att)
    return RoleLoad("decode", STEADY, figures, att)


# -------------------------------------------------------------------- split
def split_total(total: int, prefill_share: float) -> tuple[int, int]:
    """(prefill, decode) for ``total`` workers with ``prefill_share`` of them in prefill,
    within rounding, at least one per pool: ``split_total(5, 2/3) == (3, 2)``."""
    if total < 2:
        raise ValueError(f"a disaggregated deployment needs at least 2 workers, got {total}")
    p = min(max(round(total * prefill_share), 1), total - 1)
    return p, total - p


def measured_split(work: tuple[WorkSample, ...]) -> PhaseSplit | None:
    """Per-request worker-seconds of each phase over ``work``; ``None`` until both pools
    finished :data:`MIN_RATIO_REQUESTS` requests and did some work."""
    pb, pr = sum(w.prefill_busy_s for w in work), sum(w.prefill_requests for w in work)
    db, dr = sum(w.decode_busy_s for w in work), sum(w.decode_requests for w in work)
    if pr < MIN_RATIO_REQUESTS or dr < MIN_RATIO_REQUESTS or pb <= 0 or db <= 0:
        return None
    return PhaseSplit.measured(pb, pr, db, dr)


def _share(cfg: AutoscaleConfig, work: tuple[WorkSample, ...]) -> float | None:
    fixed = cfg.fixed_ratio()
    if fixed is not None:
        return fixed[0] / sum(fixed)
    split = measured_split(work)
    return None if split is None else split.prefill_share


def _with(counts: tuple[int, int], role: str, delta: int) -> tuple[int, int]:
    i = ROLES.index(role)
    out = list(counts)
    out[i] += delta
    return out[0], out[1]


# ------------------------------------------------------------------- decide
def decide(cfg: AutoscaleConfig, state: PolicyState, signals: Signals, counts: tuple[int, int],
           pending: int = 0) -> tuple[Decision, PolicyState]:
    """The decision for ``signals`` given the pools' current targets ``counts``
    (prefill, decode), and the state for the next call. See the module docstring.

    ``pending``: worker starts not yet serving (Ray has not placed them, or they load the
    model). Meanwhile nothing grows or moves (the capacity asked for is not visible in the
    signals yet); the decision says so, and the pressure keeps its timer, so the change
    follows as soon as the starts are done or have failed (and are retried)."""
    t = signals.t
    loads = (prefill_load(signals.prefill, signals.interval_s, cfg), decode_load(signals.decode, cfg))
    # One observation without pressure is tolerated: the episode ends only after a longer gap.
    tolerance = 2 * signals.interval_s
    pressure_last = tuple(t if ld.state == PRESSURE else last for ld, last in zip(loads, state.pressure_last))
    pressure_since = tuple(None if last is None or t - last >= tolerance * 0.999 else (ps if ps is not None else t)
                           for last, ps in zip(pressure_last, state.pressure_since))
    idle_since = tuple((i if i is not None else t) if ld.state == IDLE else None
                       for ld, i in zip(loads, state.idle_since))
    sample = WorkSample(t, signals.prefill.busy_s, signals.prefill.requests, signals.decode.busy_s,
                        signals.decode.requests)
    work = tuple(w for w in (*state.work, sample) if w.t > t - cfg.ratio_window_s)
    new_state = replace(state, pressure_since=pressure_since, pressure_last=pressure_last,  # type: ignore[arg-type]
                        idle_since=idle_since, work=work)
    share = _share(cfg, work)

    def hold(reason: str, capped: bool = False) -> tuple[Decision, PolicyState]:
        return Decision(t, HOLD, counts, counts, reason, loads, share, capped=capped, apply=not cfg.advisory), new_state

    if state.last_change_t is not None and t - state.last_change_t < cfg.cooldown_s:
        return hold(f"cooldown: {cfg.cooldown_s - (t - state.last_change_t):.0f} s left")
    hot = [r for r, since, ld in zip(ROLES, pressure_since, loads)
           if since is not None and t - since >= cfg.scale_up_window_s and ld.state == PRESSURE]
    pressed = any(since is not None for since in pressure_since)
    idle = [r for r, since in zip(ROLES, idle_since) if since is not None and t - since >= cfg.scale_down_window_s]
    total = sum(counts)
    action, target, switch, capped = HOLD, counts, None, False
    if hot and pending:
        return hold(f"{pending} worker start(s) pending (resources asked for from Ray); "
                    f"{', '.join(hot)} still under pressure")
    if hot:
        target = _grow(cfg, counts, hot, share)
        if target is not None:
            action = SCALE_UP
        else:
            capped = True
            target, switch = _rebalance(cfg, counts, hot, idle, share)
            action = REBALANCE if switch is not None else HOLD
    elif idle and total > cfg.min_total and not pressed:
        target = _shrink(cfg, counts, idle, share)
        action = SCALE_DOWN if target is not None else HOLD
    target = target or counts
    why = "; ".join(f"{ld.role} {ld.state} ({ld.why})" for ld in loads)
    if action == HOLD:
        if capped:
            return hold(f"{', '.join(hot)} under pressure but at max_total {cfg.max_total}: {why}", capped=True)
        return hold(why)
    decision = Decision(t, action, counts, target, why, loads, share, switch=switch, capped=capped,
                        apply=not cfg.advisory)
    # A change restarts the windows: the next one needs fresh evidence of the new sizes.
    return decision, replace(new_state, pressure_since=(None, None), pressure_last=(None, None),
                             idle_since=(None, None), last_change_t=t)


def _grow(cfg: AutoscaleConfig, counts: tuple[int, int], hot: list[str], share: float | None) -> tuple[int, int] | None:
    """The next counts with one more worker for each role under pressure (a fixed ratio steps the
    total until they gain); ``None`` when that passes ``max_total``."""
    total = sum(counts)
    if cfg.fixed_ratio() is not None:
        assert share is not None
        for n in range(total + 1, cfg.max_total + 1):
            cand = split_total(n, share)
            if all(cand[ROLES.index(r)] > counts[ROLES.index(r)] for r in hot):
                return cand
        return None
    n = total + len(hot)
    if n > cfg.max_total:
        hot = hot[:1] if total + 1 <= cfg.max_total else []
        n = total + len(hot)
        if not hot:
            return None
    cand = split_total(n, share) if share is not None else None
    # Signals win over a stale measurement: the roles under pressure gain, the others keep theirs.
    if cand is None or any(cand[ROLES.index(r)] <= counts[ROLES.index(r)] for r in hot) or any(
            cand[i] < counts[i] for i in range(2)):
        cand = counts
        for r in hot:
            cand = _with(cand, r, +1)
    return cand


def _shrink(cfg: AutoscaleConfig, counts: tuple[int, int], idle: list[str],
            share: float | None) -> tuple[int, int] | None:
    """One worker fewer, taken from an idle role (at the fixed ratio: the role the split at
    ``total - 1`` takes from, which must be idle); ``None`` when no idle role can give one."""
    total = sum(counts)
    if total - 1 < max(cfg.min_total, 2):
        return None
    if share is not None:
        cand = split_total(total - 1, share)
        losers = [r for i, r in enumerate(ROLES) if cand[i] < counts[i]]
        if cand[0] <= counts[0] and cand[1] <= counts[1] and all(r in idle for r in losers):
            return cand
        if cfg.fixed_ratio() is not None:
            return None
    for r in sorted(idle, key=lambda r: -counts[ROLES.index(r)]):  # the larger idle pool gives first
        if counts[ROLES.index(r)] > 1:
            return _with(counts, r, -1)
    return None


def _rebalance(cfg: AutoscaleConfig, counts: tuple[int, int], hot: list[str], idle: list[str],
               share: float | None) -> tuple[tuple[int, int], tuple[str, str] | None]:
    """At ``max_total`` with ratio auto: move one worker to the role under pressure from the other,
    if the other is idle or the measured split gives it fewer than it has."""
    if cfg.fixed_ratio() is not None or len(hot) != 1:
        return counts, None
    to = hot[0]
    frm = ROLES[1 - ROLES.index(to)]
    if counts[ROLES.index(frm)] <= 1:
        return counts, None
    wanted = split_total(sum(counts), share) if share is not None else None
    if frm in idle or (wanted is not None and wanted[ROLES.index(frm)] < counts[ROLES.index(frm)]):
        return _with(_with(counts, frm, -1), to, +1), (frm, to)
    return counts, None


@dataclass
class CounterDeltas:
    """Turns per-worker cumulative counters into increments per observation.

    A worker seen for the first time contributes nothing (its past is not this
    interval's); a counter that went down (the worker restarted its engine, e.g.
    after a role switch) contributes its current value.
    """

    last: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def step(self, worker_key: str, values: tuple[float, ...]) -> tuple[float, ...]:
        prev = self.last.get(worker_key)
        self.last[worker_key] = values
        if prev is None:
            return tuple(0.0 for _ in values)
        return tuple(v - p if v >= p else v for v, p in zip(values, prev))

    def forget_except(self, keys: set[str]) -> None:
        """Drop the workers no longer present."""
        for k in list(self.last):
            if k not in keys:
                del self.last[k]
