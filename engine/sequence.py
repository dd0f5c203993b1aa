"""One request's state inside an engine (torch-free)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


def sample_request_id(request_id: str, index: int) -> str:
    """The engine id of sample ``index`` of a request with ``n`` samples: sample 0
    is the request itself (it prefills the prompt), the others are its forks."""
    return request_id if index == 0 else f"{request_id}/{index}"


class SequenceStatus(enum.IntEnum):
    """Lifecycle of a sequence. Everything >= FINISHED_STOPPED is finished."""

    WAITING = 0          # queued (new, or preempted and waiting to recompute)
    RUNNING = 1          # admitted: holds KV blocks, scheduled every step
    PARKED = 2           # prefilled for export; holds blocks until released
    FINISHED_STOPPED = 3  # EOS, stop token or stop string
    FINISHED_LENGTH = 4  # max_tokens or the model's context reached
    FINISHED_ABORTED = 5  # cancelled by the caller

    @property
    def finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            SequenceStatus.FINISHED_STOPPED: "stop",
            SequenceStatus.FINISHED_LENGTH: "length",
            SequenceStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass
class Sequence:
    """Token state of one request.

    The one scheduling rule the engine uses: a step computes the tokens
    ``token_ids[num_computed_tokens:]`` (possibly only a chunk of them) and
    samples a new token only when that brings ``num_computed_tokens`` up to
    ``len(token_ids)``. Prefill, chunked prefill, decode and recompute after
    preemption are all this rule.

    ``timestamps`` holds ``time.time()`` wall-clock stamps (comparable
    across the processes of one machine): ``added`` when the sequence was
    created in this engine, ``scheduled`` when a step first computed any of
    its tokens, ``first_token`` when this engine first sampled a token for
    it. Preemption and recompute never move them.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    export_after_prefill: bool = False
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission (None: not admitted yet)
    stop_reason: str | int | None = None
    timestamps: dict[str, float] = field(default_factory=lambda: {"added": time.time()})

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
