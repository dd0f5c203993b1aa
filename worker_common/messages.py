"""Every value the router and the workers send each other, as frozen dataclasses.

Both sides import this one module, so a field is named once and the router
dispatches on a message's type, never on string keys or on error text:

- ``DecodeWorker.reserve`` returns a :class:`Reserved` (or ``None``: no room).
- ``PrefillWorker.prefill`` returns a :class:`PrefillResult` (its ``push`` a
  :class:`KVPushed`, or a :class:`WorkerError` while the KV is still held, or
  ``None`` when the first token ended the request) or a :class:`WorkerError`;
  for a request with ``n`` > 1 samples it holds each sample's first chunk and
  one push of the prompt's KV (its ``handoff.samples`` say which go on);
  ``resend`` returns a :class:`KVPushed` or a :class:`WorkerError`.
- ``DecodeWorker.generate`` / ``serve`` stream one :class:`Ack`, then
  :class:`TokenChunk` s; a :class:`WorkerError` ends the stream.
- ``limits`` returns the :class:`ModelLimits` the router validates against.

Timestamps (``t_*``) are wall clock (``time.time()``) seconds, for the
router's request timeline.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from engine.kv_cache import KVLayout
from engine.kv_handoff import KVHandoff, SampleStart
from engine.sampler import TokenLogprob
from kvtransfer.endpoints import Endpoint


@dataclass(frozen=True)
class ModelLimits:
    """The served model's name and limits (reported by a worker, checked by the router)."""

    name: str
    max_model_len: int
    vocab_size: int


class ErrorReason(enum.Enum):
    """Why a worker could not do what the router asked."""

    ABORTED = "aborted"  # the router aborted the request (before or while it ran here)
    TRANSFER_FAILED = "transfer_failed"  # the KV did not arrive / could not be pushed
    INVALID_REQUEST = "invalid_request"  # the engine refused the request (``field`` names why)
    NO_HELD_KV = "no_held_kv"  # a resend for a KV this worker no longer holds
    REQUEST_FAILED = "request_failed"  # the engine failed this request alone (e.g. its logits could not be sampled)


@dataclass(frozen=True)
class WorkerError:
    """A failure as a value: the worker stays up, the router decides what next.

    ``kv_held`` (``TRANSFER_FAILED`` on the prefill side): the KV is still held
    under its lease, so one more push may be asked for. ``field``
    (``INVALID_REQUEST``): the request field at fault. ``REQUEST_FAILED``:
    ``detail`` is the engine's message; the request's blocks are already free
    and the worker serves on.
    """

    reason: ErrorReason
    detail: str = ""
    kv_held: bool = False
    field: str | None = None

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


@dataclass(frozen=True)
class KVHandoffMeta:
    """What travels with a prefilled KV besides its bytes: the layout, the
    whole token sequence and the sampling seed, so that the decode side
    continues exactly where the prefill side stopped."""

    layout: KVLayout
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    seed: int
    start: int = 0  # the KV sent starts at this token (the decode worker cached the ones before)
    # A request with n > 1: the samples that go on decoding over this one KV (of the prompt alone),
    # each with the first token the prefill worker drew for it; empty for a request with one sample.
    samples: tuple[SampleStart, ...] = ()

    @classmethod
    def of(cls, handoff: KVHandoff, samples: tuple[SampleStart, ...] = ()) -> KVHandoffMeta:
        return cls(handoff.layout, tuple(handoff.prompt_token_ids), tuple(handoff.output_token_ids), handoff.seed,
                   handoff.start, samples)

    def with_data(self, request_id: str, data: torch.Tensor) -> KVHandoff:
        """The engine's hand-off of ``request_id``, with the KV that arrived."""
        return KVHandoff(request_id, self.layout, list(self.prompt_token_ids), list(self.output_token_ids),
                         self.seed, data, self.start)


@dataclass(frozen=True)
class Reserved:
    """A decode worker's answer to ``reserve``: blocks are held under a lease.

    ``cached_tokens``: the first tokens of the KV that this worker already
    holds in its prefix cache; only the KV from there on is expected
    (the prefill worker exports from ``cached_tokens``)."""

    endpoint: Endpoint
    cached_tokens: int = 0


@dataclass(frozen=True)
class TokenChunk:
    """New tokens of one request, in the order they were produced."""

    token_ids: tuple[int, ...]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request's sampling params ask for them
    index: int = 0  # which of the request's n samples these tokens belong to


@dataclass(frozen=True)
class KVPushed:
    """A prefilled KV that reached its decode worker's reservation."""

    handoff: KVHandoffMeta
    transfer_bytes: int
    t_transfer_start: float
    t_transfer_end: float


@dataclass(frozen=True)
class PrefillResult:
    """A prompt prefilled: its first token and what happened to its KV.

    ``push`` is ``None`` when ``first`` already finished the request (no KV
    moves), a :class:`WorkerError` when the push failed (``kv_held``: the KV
    waits for a resend or an abort).
    """

    worker_id: str
    first: TokenChunk
    t_received: float
    t_prefill_start: float
    t_prefill_end: float
    push: KVPushed | WorkerError | None = None
    cached_tokens: int = 0  # prompt tokens found in this worker's prefix cache (not computed)
    others: tuple[TokenChunk, ...] = ()  # n > 1: the first chunk of samples 1..n-1 (``first`` is sample 0's)

    @property
    def firsts(self) -> tuple[TokenChunk, ...]:
        """The first chunk of every sample, in index order."""
        return (self.first,) + self.others

    @property
    def finished(self) -> bool:
        """Every sample ended with its first token (no KV moves)."""
        return all(c.finished for c in self.firsts)


@dataclass(frozen=True)
class Ack:
    """First item of a decode stream: the request has joined the decode engine
    (``generate``: its KV imported, so the prefill side may free its copy).

    ``t_scheduled``/``t_first_token``: when the engine first scheduled it and
    produced its first token here (``None`` when it did not).
    """

    t_called: float
    t_joined: float
    num_kv_tokens: int = 0  # KV tokens imported (``generate``); 0 for ``serve``
    t_scheduled: float | None = None
    t_first_token: float | None = None
    cached_tokens: int = 0  # ``serve``: prompt tokens found in this worker's prefix cache (not computed)


DecodeEvent = Ack | TokenChunk | WorkerError
"""What a decode worker's stream yields."""
