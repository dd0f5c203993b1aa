"""Step costs measured on real hardware, for the planner's simulation (:mod:`analysis.serving_sim`).

:class:`MeasuredCosts` answers what :class:`analysis.serving_sim.StepCosts`
answers (prefill step, decode step, KV transfer, how many sequences fit),
but from measurements instead of a roofline:

- decode step: piecewise linear in the batch between the measured batches
  of ``benchmarks.engine`` (``decode[*].batch``/``ms_per_step``), extended
  linearly beyond the largest (the measured context, ~266 tokens, is kept:
  at these model sizes the step barely moves with context);
- prefill step: a straight line in the step's total prompt tokens fitted to
  ``prefill[*]`` (batch x ``prompt_len`` tokens, ``ms``) by least squares;
- KV transfer + the serving path's fixed cost per request: from
  ``benchmarks.cluster_overhead`` when given (a line through the
  ``gloo/processes`` transfer times per size, plus the cluster's TTFT over the
  engine's minus its transfer), else :data:`DEFAULT_TRANSFER`.

Pure (JSON dicts in, numbers out), so the planner stays torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

#: (fixed seconds per request, seconds per prompt token) of the KV transfer and serving path when no
#: ``cluster_overhead`` JSON is given: this machine's gloo figures of benchmarks/README.md
#: (~6 ms for a short prompt's KV, ~1.2 GB/s at 184,320 bytes/token, SmolLM2 float32) plus the
#: router's ~9 ms (reserve, routing) outside the transfer.
DEFAULT_TRANSFER = (0.015, 184_320 / 1.2e9)


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = a + b x``; one point: through the origin."""
    if not points:
        raise ValueError("no points to fit")
    if len({x for x, _ in points}) < 2:
        x, y = points[0]
        return 0.0, y / x
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise linear through ``points`` (sorted by x), extended by the end segments' slopes."""
    pts = sorted(points)
    if len(pts) == 1:
        return pts[0][1] * x / pts[0][0]
    i = 1
    while i < len(pts) - 1 and x > pts[i][0]:
        i += 1
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class MeasuredCosts:
    """Measured step costs of one worker (``devices`` 1: one engine, however many threads it had).

    ``decode_points``: (batch, seconds per step); ``prefill_line``: (seconds, seconds per prompt
    token) of one prefill step; ``transfer_line``: (seconds, seconds per prompt token) from the end
    of the prefill to the first token at the client; ``kv_tokens``: a decode worker's KV capacity
    in tokens (its ``num_blocks`` x block size).
    """

    decode_points: tuple[tuple[int, float], ...]
    prefill_line: tuple[float, float]
    transfer_line: tuple[float, float] = DEFAULT_TRANSFER
    kv_tokens: int = 512 * 16
    devices: int = 1
    source: str = ""

    def prefill_s(self, prompt_lens: list[int]) -> float:
        a, b = self.prefill_line
        return max(0.0, a + b * sum(prompt_lens))

    def decode_s(self, batch: int, mean_context: float) -> float:
        return max(1e-6, interpolate(self.decode_points, batch))

    def transfer_s(self, prompt_tokens: int) -> float:
        a, b = self.transfer_line
        return a + b * prompt_tokens

    def max_batch(self, context_len: int, cap: int) -> int:
        return max(0, min(cap, self.kv_tokens // max(1, context_len)))

    def scaled(self, decode: float, prefill: float) -> MeasuredCosts:
        """The same costs with every decode step ``decode`` times and every prefill step ``prefill``
        times longer: the slow-down of a worker that shares its cores and memory bus with others."""
        a, b = self.prefill_line
        return replace(self, decode_points=tuple((n, s * decode) for n, s in self.decode_points),
                       prefill_line=(a * prefill, b * prefill),
                       source=f"{self.source}, decode x {decode:.2f}, prefill x {prefill:.2f}")

    def describe(self) -> str:
        a, b = self.prefill_line
        dec = ", ".join(f"b{n} {s * 1000:.0f} ms" for n, s in self.decode_points)
        ta, tb = self.transfer_line
        return (f"measured costs ({self.source}): prefill {a * 1000:.0f} ms + {b * 1e6:.0f} µs/token; decode step "
                f"{dec}; transfer + path {ta * 1000:.1f} ms + {tb * 1e6:.1f} µs/token; KV {self.kv_tokens} tokens")


def from_benchmarks(engine: dict, overhead: dict | None = None, kv_tokens: int = 512 * 16,
                    source: str = "") -> MeasuredCosts:
    """:class:`MeasuredCosts` from a ``benchmarks.engine`` JSON (float32 ``decode``/``prefill``
    sections) and, optionally, a ``benchmarks.cluster_overhead`` JSON."""
    decode = tuple(sorted((int(d["batch"]), float(d["ms_per_step"]) / 1000) for d in engine["decode"]))
    prefill = [(float(p["batch"] * p["prompt_len"]), float(p["ms"]) / 1000) for p in engine["prefill"]]
    if not decode or not prefill:
        raise ValueError("the engine JSON has no decode or prefill measurements")
    a, b = fit_line(prefill)
    if a < 0:  # two points that bend down toward zero: keep the per-token cost, drop a negative fixed cost
        a, b = 0.0, max(y / x for x, y in prefill)
    transfer = DEFAULT_TRANSFER
    if overhead is not None:
        transfer = transfer_from_overhead(overhead)
    return MeasuredCosts(decode, (a, b), transfer, kv_tokens, 1, source)


def transfer_from_overhead(overhead: dict) -> tuple[float, float]:
    """(fixed s, s per token) of a request's path from prefill end to first token, from a
    ``benchmarks.cluster_overhead`` JSON: the gloo cross-process transfer line plus the cluster's
    TTFT over the engine's outside the transfer (router, reservation, polling)."""
    sizes = overhead["transfer"]["backends"]["gloo/processes"]
    a, b = fit_line([(float(v["tokens"]), float(v["ms"]) / 1000) for v in sizes.values() if isinstance(v, dict)])
    cluster = overhead.get("cluster") or {}
    extra = 0.0
    if "ttft_overhead_ms" in cluster and "server" in cluster:
        extra = max(0.0, (cluster["ttft_overhead_ms"] - cluster["server"]["transfer_ms"]) / 1000)
    return max(0.0, a) + extra, b


def relative_error(predicted: float | None, measured: float | None) -> float:
    """(predicted - measured) / measured; NaN when either is missing or measured is 0."""
    if predicted is None or measured is None or measured == 0 or not math.isfinite(measured):
        return math.nan
    return (predicted - measured) / measured
