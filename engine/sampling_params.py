"""Per-request sampling parameters and their validation (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, replace


class InvalidRequestError(ValueError):
    """A request was refused; ``field`` names the offending request field.

    The router (a later layer) maps this to gRPC ``INVALID_ARGUMENT`` with the
    field in the message; the engine raises it before touching any state, so a
    bad request never disturbs the ones already running.
    """

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 5  # most alternatives reported per generated token


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature == 0`` means greedy. ``top_k == 0`` disables top-k and
    ``top_p == 1.0`` disables nucleus sampling. ``seed`` makes sampled output
    reproducible: the generator for output token *i* is seeded from
    ``(seed, i)``, so the result does not depend on batch composition, on
    preemption, or on which engine instance continues a handed-off request.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # None: no log-probabilities. k >= 0: each generated token's log-probability
    # under the model, with the k most likely tokens at its position.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_sample(self, index: int) -> SamplingParams:
        """The params of sample ``index`` of a request with ``n`` samples: seed ``seed + index``
        (a lone request with that seed draws the same tokens); unseeded stays unseeded."""
        return self if self.seed is None or index == 0 else replace(self, seed=self.seed + index)

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also catches NaN
            raise InvalidRequestError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError("stop", f"a stop string is longer than {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError("stop_token_ids",
                                      f"at most {MAX_STOP_TOKEN_IDS} token ids, got {len(self.stop_token_ids)}")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", "token ids must be integers >= 0")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
