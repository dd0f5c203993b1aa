"""The stages of one request, the stamps that bound them, and the one
computation of how long each stage took.

A request's :class:`Timeline` is a set of wall-clock stamps (``time.time()``;
0.0 = not reached) taken by the router and, for the stages on a worker, by
the worker (one machine's clock, or the nodes' synced clocks). Each
:class:`Stage` spans two of them; :func:`stage_seconds` is the only code that
turns stamps into durations. Everything else iterates over :class:`Stage`:
the metric's ``stage`` label, the router's ``Timings`` fields (through
:data:`TIMINGS_FIELDS`), the client's ``--timeline`` and the benchmark
summaries.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, fields
from typing import Any


class Stage(enum.Enum):
    """A stage of a request, in lifecycle order. The value is its name
    everywhere: the metric label and ``Timings.slowest_stage``."""

    #: Router receipt (validation and tokenization included) -> a decode
    #: worker reserved KV blocks for it (it waited for a decode worker with
    #: room until then). Colocated: -> the worker received the call.
    QUEUE = "queue"
    #: The prefill worker received it -> its engine scheduled the first prompt chunk.
    PREFILL_QUEUE = "prefill_queue"
    #: First prompt chunk scheduled -> first token sampled.
    PREFILL = "prefill"
    #: The KV push started -> the receiver acknowledged it.
    TRANSFER = "transfer"
    #: The decode worker was asked to continue it -> it joined the running
    #: batch (waiting for the KV, importing it).
    DECODE_QUEUE = "decode_queue"
    #: First token left the router -> last token left it.
    DECODE = "decode"


class RequestPath(enum.Enum):
    """Which way a request went through the cluster (``Timings.path``); the
    stages it reached follow from it (``decode_only`` has no transfer)."""

    #: Prefilled on a prefill worker; its KV (the part the decode worker
    #: did not already cache) moved to the decode worker.
    DISAGGREGATED = "disaggregated"
    #: Conditional disaggregation: the decode worker prefilled the uncached
    #: part of the prompt itself (short, or mostly cached there); nothing moved.
    DECODE_ONLY = "decode_only"
    #: One colocated replica ran both phases (``pools.mode: colocated``).
    COLOCATED = "colocated"


#: Each stage's duration field in ``protos/serving.proto``'s ``Timings`` (milliseconds).
TIMINGS_FIELDS: dict[Stage, str] = {
    Stage.QUEUE: "queue_ms",
    Stage.PREFILL_QUEUE: "prefill_queue_ms",
    Stage.PREFILL: "prefill_ms",
    Stage.TRANSFER: "transfer_ms",
    Stage.DECODE_QUEUE: "decode_queue_ms",
    Stage.DECODE: "decode_ms",
}


def _attempt_stamp() -> Any:
    """A stamp of one attempt: a retry starts it over (see :meth:`Timeline.new_attempt`)."""
    return field(default=0.0, metadata={"per_attempt": True})


@dataclass
class Timeline:
    """Wall-clock stamps of one request's stages (0.0 = not reached).

    On a retry the per-attempt stamps are those of the last attempt. The
    stamps after ``received`` are, in this order, the fields of
    ``protos/serving.proto``'s ``Timeline`` (with ``_ms``), as offsets from it.
    """

    received: float = field(default_factory=time.time)  # the router got the request
    admitted: float = 0.0  # validated and tokenized by the router
    reserved: float = _attempt_stamp()  # a decode worker reserved KV blocks
    prefill_queued: float = _attempt_stamp()  # the prefill worker received it
    prefill_start: float = _attempt_stamp()  # its engine scheduled the first prompt chunk
    prefill_end: float = _attempt_stamp()  # the first token was sampled
    transfer_start: float = _attempt_stamp()  # the KV push started
    transfer_end: float = _attempt_stamp()  # the receiver acknowledged it
    decode_queued: float = _attempt_stamp()  # the decode worker was asked to continue it
    decode_start: float = _attempt_stamp()  # it joined the decode worker's running batch
    first_token: float = 0.0  # the first token left the router
    finished: float = 0.0  # the last response left the router

    def new_attempt(self) -> None:
        """Clear the per-attempt stamps: a retry stamps its stages afresh."""
        for f in fields(Timeline):
            if f.metadata.get("per_attempt"):
                setattr(self, f.name, 0.0)

    @staticmethod
    def stamp_names() -> tuple[str, ...]:
        """The stamps after ``received``, in lifecycle order (the proto ``Timeline``'s fields, less ``_ms``)."""
        return tuple(f.name for f in fields(Timeline) if f.name != "received")


def _span(start: float, end: float) -> float | None:
    return end - start if start and end and end >= start else None


def stage_seconds(t: Timeline) -> dict[Stage, float]:
    """Seconds spent in each stage the request reached, in stage order
    (a stage with a missing or inverted stamp is left out)."""
    spans = {
        # Disaggregated: until a decode worker reserved; colocated (no
        # reservation): until the worker received the call.
        Stage.QUEUE: _span(t.received, t.reserved or t.prefill_queued),
        Stage.PREFILL_QUEUE: _span(t.prefill_queued, t.prefill_start),
        Stage.PREFILL: _span(t.prefill_start, t.prefill_end),
        Stage.TRANSFER: _span(t.transfer_start, t.transfer_end),
        Stage.DECODE_QUEUE: _span(t.decode_queued, t.decode_start),
        Stage.DECODE: _span(t.first_token, t.finished),
    }
    return {stage: s for stage, s in spans.items() if s is not None}
