"""The Llama forward's elementwise pieces, bit-identical to ``transformers``' formulas in float32 and in as few
Python-level calls as that allows (at batch 1 each call costs about as much as the arithmetic): shared by the
eager runner, the compiled decode step and the whole-sequence forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' LlamaRMSNorm: op for op in float32 (the exactness reference); a 16-bit ``h`` goes
    through torch's one ``rms_norm`` call (float32 inside, rounded once), which saves the seven Python-level
    calls that made the norms a fifth of a batch-1 decode step."""
    if h.dtype != torch.float32:
        return F.rms_norm(h, (h.shape[-1],), weight, eps)
    variance = h.pow(2).mean(-1, keepdim=True)
    return weight * (h * torch.rsqrt(variance + eps))


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the first half of its last dimension negated: what :func:`rotate` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``transformers``' apply_rotary_pos_emb for one tensor, ``x * cos + rotate_half(x) * sin``, computed as
    ``x * cos + roll(x, half) * sin_signed`` (:func:`signed_sin`): ``rotate_half(x) = cat(-x2, x1)`` and
    ``(-x2) * s1 == x2 * (-s1)`` exactly, so float32 stays bit-identical, in four calls instead of seven."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed
