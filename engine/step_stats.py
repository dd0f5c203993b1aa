"""Per-step accounting of an engine: time, batch, tokens, modelled bytes and FLOPs (torch-free).

Each :meth:`LLMEngine.step` that computes something is recorded once:

1. its wall time (schedule, forward, sampling and postprocessing), the
   sequences in its batch, and the tokens it computed, split into prefill
   (prompt chunks, recompute after preemption) and decode (one token
   attending to a cached context — the model runner's own split);
2. the bytes it moved and the FLOPs it computed, from the analytic cost
   model (:mod:`analysis.cost_model`): a mixed step is the sum of its decode
   part and its prefill part, with the weights read once (see
   :func:`step_cost`);
3. cumulative counters (never reset) and a bounded ring of recent steps.

MBU = bytes / step time / peak bandwidth and MFU = FLOPs / step time /
peak FLOP/s, against the peaks the worker measured when it started
(``peaks=None``: no MBU/MFU, everything else still counts). The recent
window's MBU/MFU divide the window's total bytes/FLOPs by its total step
time, i.e. utilisation while busy, weighted by step time. Idle time is not
in it; ``rate()`` of the counters over wall time gives the other view.

The accumulator is written by the stepping thread and read by status
calls from another thread, so both sides take a lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from analysis.machine_peaks import MachinePeaks

DEFAULT_WINDOW_STEPS = 256
DEFAULT_WINDOW_S = 10.0


class CostModel(Protocol):
    """What the accounting needs of :class:`analysis.cost_model.ModelDims`."""

    def decode_step(self, batch: int, context_len: float, dtype_bytes: float) -> tuple[float, float]: ...

    def prefill(self, prompt_lens: list[int], dtype_bytes: float) -> tuple[float, float]: ...

    def weight_bytes_read(self, rows_looked_up: int, dtype_bytes: float) -> float: ...

    def kv_bytes_per_token(self, dtype_bytes: float) -> int: ...

    def attention_flops(self, num_pairs: float) -> float: ...


class Chunk(Protocol):
    """A scheduled chunk as :class:`engine.scheduler.ScheduledChunk` has it."""

    start: int
    num_tokens: int


def is_decode(chunk: Chunk) -> bool:
    """One token attending to a cached context: the model runner's decode path."""
    return chunk.num_tokens == 1 and chunk.start > 0


@dataclass(frozen=True)
class StepRecord:
    """One engine step. ``end_time`` is ``time.time()`` when it finished."""

    end_time: float
    seconds: float
    batch_size: int
    prefill_tokens: int
    decode_tokens: int
    bytes: float
    flops: float

    def mbu(self, peaks: MachinePeaks | None) -> float | None:
        return _ratio(self.bytes, self.seconds, peaks.bandwidth_bytes_per_s if peaks else None)

    def mfu(self, peaks: MachinePeaks | None) -> float | None:
        return _ratio(self.flops, self.seconds, peaks.flops_per_s if peaks else None)


@dataclass(frozen=True)
class StepStatsSnapshot:
    """What :meth:`StepStats.snapshot` reports, as plain numbers (defaults: a fresh accumulator).

    Cumulative counters since start, the figures of the recent window (steps
    that ended within ``window_s``), and the peaks. The ``recent_*`` ratios
    are ``None`` without peaks or without recent steps; the peaks are
    ``None`` when the worker measured none.
    """

    steps: int = 0
    busy_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    batch_size_sum: int = 0
    recent_steps: int = 0  # steps within the window
    recent_seconds: float = 0.0  # their busy seconds
    recent_batch_size: float | None = None  # mean sequences per step
    recent_mbu: float | None = None
    recent_mfu: float | None = None
    peak_bandwidth_bytes_per_s: float | None = None
    peak_flops_per_s: float | None = None
    window_s: float = DEFAULT_WINDOW_S


def _ratio(amount: float, seconds: float, peak: float | None) -> float | None:
    if not peak or seconds <= 0:
        return None
    return amount / seconds / peak


def step_cost(cost: CostModel | None, dtype_bytes: float, chunks: Iterable[Chunk]) -> tuple[float, float]:
    """(bytes, FLOPs) of one step's chunks: decode part + prefill part.

    The decode part is ``decode_step(batch, mean context)`` (context = the
    keys each decode token attends to); the prefill part is
    ``prefill(chunk lengths)``. Two corrections make the sum one forward:

    - the weights are read once per step, not once per part, so a mixed
      step takes one ``weight_bytes_read(0)`` off the sum;
    - a later chunk of a long prompt (``start > 0``) also reads the KV of
      its ``start`` earlier tokens back and attends to them
      (``num_tokens * start`` more query-key pairs).

    A chunk that does not end its prompt is still charged the logits row
    ``prefill`` counts for it (a small overcount).
    """
    if cost is None:
        return 0.0, 0.0
    contexts: list[int] = []
    prefill_lens: list[int] = []
    earlier_tokens = earlier_pairs = 0
    for c in chunks:
        if is_decode(c):
            contexts.append(c.start + 1)
        else:
            prefill_lens.append(c.num_tokens)
            earlier_tokens += c.start
            earlier_pairs += c.num_tokens * c.start
    nbytes = flops = 0.0
    if contexts:
        b, f = cost.decode_step(len(contexts), sum(contexts) / len(contexts), dtype_bytes)
        nbytes, flops = nbytes + b, flops + f
    if prefill_lens:
        b, f = cost.prefill(prefill_lens, dtype_bytes)
        nbytes += b + earlier_tokens * cost.kv_bytes_per_token(dtype_bytes)
        flops += f + cost.attention_flops(earlier_pairs)
    if contexts and prefill_lens:
        nbytes -= cost.weight_bytes_read(0, dtype_bytes)
    return float(nbytes), float(flops)


class StepStats:
    """Cumulative and recent step accounting; see the module docstring.

    ``window_steps`` bounds the ring of recent steps; ``window_s`` is how far
    back the ``recent_*`` figures of :meth:`snapshot` look (an idle worker
    reports no recent figures rather than stale ones).
    """

    def __init__(
        self,
        cost_model: CostModel | None,
        dtype_bytes: float,
        peaks: MachinePeaks | None = None,
        *,
        window_steps: int = DEFAULT_WINDOW_STEPS,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.cost_model = cost_model
        self.dtype_bytes = dtype_bytes
        self.peaks = peaks
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: deque[StepRecord] = deque(maxlen=window_steps)
        self.steps = 0
        self.busy_seconds = 0.0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.bytes = 0.0
        self.flops = 0.0
        self.batch_size_sum = 0

    def set_peaks(self, peaks: MachinePeaks | None) -> None:
        """Use ``peaks`` from now on (the worker measures them once at start)."""
        with self._lock:
            self.peaks = peaks

    # ----------------------------------------------------------------- write
    def record_chunks(self, chunks: list[Chunk], seconds: float) -> StepRecord:
        """Record a step that computed ``chunks`` in ``seconds``; costs it with the cost model."""
        decode = sum(1 for c in chunks if is_decode(c))
        prefill = sum(c.num_tokens for c in chunks if not is_decode(c))
        nbytes, flops = step_cost(self.cost_model, self.dtype_bytes, chunks)
        return self.record(seconds, len(chunks), prefill, decode, nbytes, flops)

    def record(self, seconds: float, batch_size: int, prefill_tokens: int, decode_tokens: int,
               nbytes: float, flops: float) -> StepRecord:
        """Record one step from its figures."""
        rec = StepRecord(self._clock(), seconds, batch_size, prefill_tokens, decode_tokens, nbytes, flops)
        with self._lock:
            self._recent.append(rec)
            self.steps += 1
            self.busy_seconds += seconds
            self.prefill_tokens += prefill_tokens
            self.decode_tokens += decode_tokens
            self.bytes += nbytes
            self.flops += flops
            self.batch_size_sum += batch_size
        return rec

    # ------------------------------------------------------------------ read
    def recent(self, window_s: float | None = None) -> list[StepRecord]:
        """The recorded steps that ended within ``window_s`` (default: the window), oldest first."""
        since = self._clock() - (self.window_s if window_s is None else window_s)
        with self._lock:
            return [r for r in self._recent if r.end_time >= since]

    def recent_steps(self, n: int | None = None) -> list[dict[str, Any]]:
        """The last ``n`` steps of the ring (all by default), each with its own MBU and MFU."""
        with self._lock:
            records, peaks = list(self._recent), self.peaks
        records = records[-n:] if n else records
        return [{**asdict(r), "mbu": r.mbu(peaks), "mfu": r.mfu(peaks)} for r in records]

    def snapshot(self) -> StepStatsSnapshot:
        """Counters since start, the recent window, and the peaks (see :class:`StepStatsSnapshot`)."""
        recent = self.recent()
        with self._lock:
            counters = StepStatsSnapshot(
                steps=self.steps, busy_seconds=self.busy_seconds, prefill_tokens=self.prefill_tokens,
                decode_tokens=self.decode_tokens, bytes=self.bytes, flops=self.flops,
                batch_size_sum=self.batch_size_sum, window_s=self.window_s)
            peaks = self.peaks
        seconds = sum(r.seconds for r in recent)
        return replace(
            counters,
            recent_steps=len(recent),
            recent_seconds=seconds,
            recent_batch_size=sum(r.batch_size for r in recent) / len(recent) if recent else None,
            recent_mbu=_ratio(sum(r.bytes for r in recent), seconds, peaks.bandwidth_bytes_per_s if peaks else None),
            recent_mfu=_ratio(sum(r.flops for r in recent), seconds, peaks.flops_per_s if peaks else None),
            peak_bandwidth_bytes_per_s=peaks.bandwidth_bytes_per_s if peaks else None,
            peak_flops_per_s=peaks.flops_per_s if peaks else None,
        )
