"""The Llama forward's elementwise pieces, ``transformers``' formulas op for op (float32 stays bit-identical):
shared by the eager runner, the compiled decode step and the whole-sequence forward."""

from __future__ import annotations

import torch


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' LlamaRMSNorm, op for op (in float32, then back to ``h``'s dtype)."""
    hf = h.to(torch.float32)
    variance = hf.pow(2).mean(-1, keepdim=True)
    return weight * (hf * torch.rsqrt(variance + eps)).to(h.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``transformers``' apply_rotary_pos_emb for one tensor: ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
