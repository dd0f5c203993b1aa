"""The colocated replica: one worker that runs both phases of its requests."""

from __future__ import annotations

from decode_worker.worker import DecodeWorker


class ColocatedWorker(DecodeWorker):
    """A replica that runs both phases of its requests (``pools.mode: colocated``):
    the router calls :meth:`DecodeWorker.serve` on it and nothing moves."""

    kind = "colocated"
