"""The Llama forward's elementwise pieces, bit-identical to ``transformers``' formulas in float32 and in as few
Python-level calls as that allows (at batch 1 each call costs about as much as the arithmetic): shared by the
eager runner, the compiled decode step and the whole-sequence forward."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from engine.cpu_kernels import load_cpu_kernels

log = logging.getLogger(__name__)


FUSED_DTYPES = (torch.bfloat16, torch.float16)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' LlamaRMSNorm: op for op in float32 (the exactness reference). A 16-bit ``h`` goes
    through the project's fused CPU kernel (:func:`fused_norms`: one call, ~4 us at batch 1), else torch's
    ``rms_norm`` and the weight's product (two calls, ~22 us); both compute in float32 and round where
    transformers rounds (the normalized row, then its product with the weight), so they agree bit for bit."""
    if h.dtype == torch.float32:
        variance = h.pow(2).mean(-1, keepdim=True)
        return weight * (h * torch.rsqrt(variance + eps))
    fused = _fused_for(h, weight)
    if fused is not None:
        return fused.rms_norm(h, weight, eps)
    return F.rms_norm(h, (h.shape[-1],), None, eps) * weight  # rounded before the weight, as transformers


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: ``(h + delta, rms_norm(h + delta))``. With the fused CPU kernel
    ``h`` is updated in place (the caller must own it) and both happen in one call; the sum is rounded to
    ``h``'s dtype exactly as ``h + delta`` is."""
    fused = _fused_for(h, weight)
    if fused is not None and delta.dtype == h.dtype and delta.is_contiguous() and delta.shape == h.shape:
        return h, fused.add_rms_norm(h, delta, weight, eps)
    h = h + delta
    return h, rms_norm(h, weight, eps)


def _fused_for(h: torch.Tensor, weight: torch.Tensor):
    """The fused norm operators when they apply to ``h`` (16-bit, CPU, contiguous, eager), else None."""
    if h.dtype not in FUSED_DTYPES or h.device.type != "cpu" or not h.is_contiguous() or weight.dtype != h.dtype \
            or torch.compiler.is_compiling():  # the compiled decode step keeps torch's operators
        return None
    return fused_norms()


@functools.cache
def fused_norms():
    """``torch.ops.splitserve_cpu`` when its RMSNorm operators are built here (:mod:`engine.cpu_kernels`),
    else None and one warning (torch's ``rms_norm`` computes the same, in more calls)."""
    problem = load_cpu_kernels()
    if problem is not None:
        log.warning("fused RMSNorm kernel unavailable, torch's rms_norm is used instead: %s", problem)
        return None
    return torch.ops.splitserve_cpu


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the first half of its last dimension negated: what :func:`rotate` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``transformers``' apply_rotary_pos_emb for one tensor, ``x * cos + rotate_half(x) * sin``, computed as
    ``x * cos + roll(x, half) * sin_signed`` (:func:`signed_sin`): ``rotate_half(x) = cat(-x2, x1)`` and
    ``(-x2) * s1 == x2 * (-s1)`` exactly, so float32 stays bit-identical, in four calls instead of seven."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed
