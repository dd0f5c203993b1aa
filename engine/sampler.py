"""Pick the next token of each sampling sequence from its logits."""

from __future__ import annotations

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


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], output_indices: list[int]) -> list[int]:
    """One token per row of ``logits`` ``[S, vocab]``."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].float() / p.temperature
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
        g = torch.Generator().manual_seed(token_seed(seeds[i], output_indices[i]))
        tokens[i] = int(torch.multinomial(probs, 1, generator=g).item())
    return tokens
