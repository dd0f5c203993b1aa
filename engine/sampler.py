"""Pick the next token of each sampling sequence from its logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

# Mixes (seed, output index) into one generator seed; any odd 64-bit constant works.
_SEED_MIX = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


def token_seed(seed: int, output_index: int) -> int:
    """Generator seed for output token ``output_index`` of a request.

    Stateless on purpose: the token drawn at a given index depends only on the
    request's seed and logits, not on which engine, batch or retry drew it.
    """
    return (seed * _SEED_MIX + output_index + 1) & _SEED_MASK


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the ``top``
    most likely tokens at its position as ``(token_id, logprob)``, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams],
                   tokens: list[int | "SamplingError"]) -> list[TokenLogprob | None]:
    """For each row whose params ask for logprobs, the sampled token's :class:`TokenLogprob`.

    Log-probabilities are those of the model's own distribution
    (``log_softmax`` of the raw logits, in float64), before temperature,
    top-k or top-p, as vLLM reports them by default; so greedy and sampled
    requests report the same numbers for the same token.
    """
    out: list[TokenLogprob | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None and isinstance(tokens[i], int)]
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].double(), dim=-1)
    k = max(params[i].logprobs for i in rows)
    top_vals, top_ids = torch.topk(lp, k, dim=-1) if k > 0 else (None, None)
    for j, i in enumerate(rows):
        tok = int(tokens[i])
        top: tuple[tuple[int, float], ...] = ()
        if params[i].logprobs:
            n = params[i].logprobs
            top = tuple(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()))
        out[i] = TokenLogprob(tok, float(lp[j, tok]), top)
    return out


class SamplingError(RuntimeError):
    """Sampling one request's next token failed (e.g. non-finite logits); only that request fails."""


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
           output_indices: list[int]) -> list[int | SamplingError]:
    """One token per row of ``logits`` ``[S, vocab]``, or the :class:`SamplingError`
    of that row: a row that cannot be sampled never fails the others."""
    # float32 first: argmax over a bfloat16 row is 5x slower than the conversion and a float32 argmax
    # (the conversion is exact, so the token is the same)
    tokens: list[int | SamplingError] = list(logits.float().argmax(dim=-1).tolist())
    for i, p in enumerate(params):
        if p.greedy:
            continue
        try:
            tokens[i] = _sample_row(logits[i], p, token_seed(seeds[i], output_indices[i]))
        except (RuntimeError, ValueError) as e:
            tokens[i] = SamplingError(f"sampling failed: {e}")
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, seed: int) -> int:
    # float64 and max-subtracted before dividing: (x - max) / T <= 0 for every
    # accepted temperature, so even a subnormal T (1e-40) cannot overflow; the
    # top token keeps probability mass exp(0) = 1 and the rest underflow to 0.
    row = logits.double()
    if not bool(torch.isfinite(row).any()):
        raise SamplingError("every logit is non-finite")
    row = (row - row.max()) / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        keep = (torch.cumsum(sorted_probs, 0) - sorted_probs) < p.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    g = torch.Generator().manual_seed(seed)
    return int(torch.multinomial(probs, 1, generator=g).item())
