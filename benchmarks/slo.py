"""Per-request records and what is computed from them: percentiles, SLO
attainment, run summaries and DistServe goodput.

Torch- and gRPC-free, so that any report can load saved records
(:meth:`RequestRecord.from_dict`) and recompute. Vocabulary as in
docs/architecture.md ("Measurement"), all measured at the client:

- **TTFT**: request sent -> first response carrying tokens.
- **TPOT**: (last token's arrival - first token's arrival) / (tokens - 1);
  undefined (``None``) with fewer than 2 tokens.
- **ITL**: every gap between consecutive token-carrying responses.
- **E2E**: request sent -> stream ended.

A request *meets the SLO* only if it finished OK (gRPC OK and a
``length``/``stop`` finish) and both its TTFT and TPOT are within the limits
(a request with one token has no TPOT and meets that half). Attainment is over
every request sent, failed ones included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from observability.stages import TIMINGS_FIELDS, Stage

ATTAINMENT_TARGET = 0.9
#: The router's ``Timings`` fields a record's ``server`` may hold, averaged by
#: :func:`summarize`: every stage's duration, the whole-request latencies, the KV bytes,
#: the prefix-cache hits (tokens not computed / not moved, bytes not moved).
SERVER_FIELDS = (*(TIMINGS_FIELDS[stage] for stage in Stage), "ttft_ms", "tpot_ms", "e2e_ms", "transfer_bytes",
                 "prefill_cached_tokens", "decode_cached_tokens", "transfer_bytes_saved")


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are seconds since the run started
    (one monotonic clock); ``token_times_s[i]`` is when the i-th token-carrying
    response arrived and ``token_counts[i]`` how many tokens it carried."""

    index: int
    request_id: str
    kind: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    conversation: int | None = None
    turn: int | None = None
    scheduled_s: float = 0.0
    ready_s: float = 0.0
    start_s: float | None = None
    end_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    status: str = "OK"
    error: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    server: dict[str, float] = field(default_factory=dict)
    path: str = ""  # the router's Timings.path: disaggregated, decode_only or colocated
    decode_worker: str = ""  # the router's Timings.decode_worker: which worker decoded it (routing)

    @property
    def ok(self) -> bool:
        """Finished normally: gRPC OK and a ``length`` or ``stop`` finish."""
        return self.status == "OK" and self.finish_reason in ("length", "stop")

    @property
    def error_kind(self) -> str | None:
        """``None`` when ok, else the gRPC status code name, or ``FINISH_<reason>``."""
        if self.ok:
            return None
        if self.status != "OK":
            return self.status
        return f"FINISH_{(self.finish_reason or 'none').upper()}"

    @property
    def tokens_received(self) -> int:
        return sum(self.token_counts)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.start_s if self.token_times_s and self.start_s is not None else None

    @property
    def tpot_s(self) -> float | None:
        n = self.tokens_received
        return (self.token_times_s[-1] - self.token_times_s[0]) / (n - 1) if n >= 2 else None

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e_s(self) -> float | None:
        return self.end_s - self.start_s if self.end_s is not None and self.start_s is not None else None

    def to_dict(self) -> dict:
        """JSON-ready fields plus the derived latencies (ms)."""
        d = asdict(self)
        d.update(ok=self.ok, ttft_ms=_ms(self.ttft_s), tpot_ms=_ms(self.tpot_s), e2e_ms=_ms(self.e2e_s),
                 tokens_received=self.tokens_received)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        """Inverse of :meth:`to_dict` (derived fields are ignored)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class SLO:
    """Latency limits in ms; ``None`` means no limit on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass(frozen=True)
class Goodput:
    """DistServe goodput over a rate sweep (see :func:`goodput`)."""

    rate: float
    target: float
    lower_bound: bool  # every rate up to the highest tested met the target: the true goodput is >= rate
    none_met: bool  # no tested rate met it: the goodput is below the lowest rate tested, reported as 0
    non_monotone: bool  # some rate below the chosen one missed the target (noise, or a real dip)
    bracket: tuple[float, float] | None  # (last rate meeting, next rate missing) interpolated between
    note: str = ""


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1000.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order
    statistics (numpy's default): rank ``(n - 1) * q / 100``. NaN when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: Iterable[float]) -> dict[str, float | int]:
    """``n``, ``mean``, ``p50``, ``p90``, ``p99``, ``max`` of ``values`` (NaN when empty)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"n": 0, "mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
    return {"n": len(xs), "mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "max": max(xs)}


def meets_ttft(r: RequestRecord, slo: SLO) -> bool:
    """Finished OK and TTFT within ``slo.ttft_ms``."""
    return r.ok and (slo.ttft_ms is None or (r.ttft_s is not None and r.ttft_s * 1000.0 <= slo.ttft_ms))


def meets_tpot(r: RequestRecord, slo: SLO) -> bool:
    """Finished OK and TPOT within ``slo.tpot_ms`` (vacuous with < 2 tokens)."""
    return r.ok and (slo.tpot_ms is None or r.tpot_s is None or r.tpot_s * 1000.0 <= slo.tpot_ms)


def meets_slo(r: RequestRecord, slo: SLO) -> bool:
    """Finished OK and both the TTFT and the TPOT limit hold."""
    return meets_ttft(r, slo) and meets_tpot(r, slo)


def attainment(records: Sequence[RequestRecord], slo: SLO) -> dict[str, float]:
    """Fractions of all ``records`` meeting both SLOs (``both``), the TTFT one, the TPOT one."""
    n = len(records)
    if n == 0:
        return {"both": math.nan, "ttft": math.nan, "tpot": math.nan}
    return {"both": sum(meets_slo(r, slo) for r in records) / n,
            "ttft": sum(meets_ttft(r, slo) for r in records) / n,
            "tpot": sum(meets_tpot(r, slo) for r in records) / n}


def summarize(records: Sequence[RequestRecord], slo: SLO, duration_s: float | None = None) -> dict:
    """One run's figures: latency stats (ms) over ok requests, throughput, attainment,
    errors by code, server stage means.

    ``duration_s`` defaults to the first send -> the last end; throughput
    counts ok requests and the tokens they received.
    """
    ok = [r for r in records if r.ok]
    starts = [r.start_s for r in records if r.start_s is not None]
    ends = [r.end_s for r in records if r.end_s is not None]
    if duration_s is None:
        duration_s = (max(ends) - min(starts)) if starts and ends else 0.0
    errors: dict[str, int] = {}
    for r in records:
        if r.error_kind:
            errors[r.error_kind] = errors.get(r.error_kind, 0) + 1
    out_tokens = sum(r.tokens_received for r in ok)
    server = {}
    for key in SERVER_FIELDS:
        xs = [r.server[key] for r in ok if key in r.server]
        server[key] = sum(xs) / len(xs) if xs else math.nan
    lags = [r.start_s - r.ready_s for r in records if r.start_s is not None]
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else math.nan,
        "output_token_throughput": out_tokens / duration_s if duration_s > 0 else math.nan,
        "output_tokens": out_tokens,
        "length_mismatches": sum(r.tokens_received != r.output_tokens for r in ok),
        "ttft_ms": stats(_ms(r.ttft_s) for r in ok),
        "tpot_ms": stats(_ms(r.tpot_s) for r in ok),
        "itl_ms": stats(g * 1000.0 for r in ok for g in r.itls_s),
        "e2e_ms": stats(_ms(r.e2e_s) for r in ok),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "attainment": attainment(records, slo),
        "server_mean": server,
        "send_lag_ms": stats(x * 1000.0 for x in lags),
    }


def goodput(points: Sequence[tuple[float, float]], target: float = ATTAINMENT_TARGET) -> Goodput:
    """DistServe goodput from ``(rate, attainment)`` points of a sweep.

    The goodput is the highest tested rate ``r_m`` whose attainment is >=
    ``target``, linearly interpolated toward the next tested rate ``r_f``
    (which misses it): ``r_m + (r_f - r_m) * (a_m - target) / (a_m - a_f)``,
    i.e. where the straight line between the two points crosses ``target``.
    Edge cases: no rate meets the target -> 0 (``none_met``; the goodput is
    below the lowest rate tested); the highest rate tested meets it -> that
    rate, flagged ``lower_bound``. A rate below ``r_m`` that misses the
    target sets ``non_monotone`` (the result still uses ``r_m``).
    """
    pts = sorted((float(r), float(a)) for r, a in points if not (math.isnan(r) or math.isnan(a)))
    if not pts:
        return Goodput(0.0, target, False, True, False, None, "no rates")
    meeting = [i for i, (_, a) in enumerate(pts) if a >= target]
    if not meeting:
        return Goodput(0.0, target, False, True, False, None,
                       f"no rate met {target:.0%}: goodput < lowest rate tested ({pts[0][0]:g})")
    m = meeting[-1]
    non_monotone = any(a < target for _, a in pts[:m])
    r_m, a_m = pts[m]
    if m == len(pts) - 1:
        return Goodput(r_m, target, True, False, non_monotone, None,
                       f"the highest rate tested met {target:.0%}: goodput >= {r_m:g}")
    r_f, a_f = pts[m + 1]
    rate = r_m + (r_f - r_m) * (a_m - target) / (a_m - a_f)
    return Goodput(rate, target, False, False, non_monotone, (r_m, r_f),
                   f"interpolated between {r_m:g} ({a_m:.0%}) and {r_f:g} ({a_f:.0%})")
