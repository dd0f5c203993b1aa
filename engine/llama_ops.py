"""The Llama forward's elementwise pieces, bit-identical to ``transformers``' formulas in float32 and in as few
Python-level calls as that allows (at batch 1 each call costs about as much as the arithmetic): shared by the
eager runner, the compiled decode step and the whole-sequence forward."""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from engine.cpu_kernels import load_cpu_kernels
from engine.kv_cache import write_layer_kv

log = logging.getLogger(__name__)


FUSED_DTYPES = (torch.bfloat16, torch.float16)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' LlamaRMSNorm: op for op in float32 (the exactness reference). A 16-bit ``h`` goes
    through the project's fused CPU kernel (:func:`fused_cpu_ops`: one call, ~4 us at batch 1), else torch's
    ``rms_norm`` and the weight's product (two calls, ~22 us); both compute in float32 and round where
    transformers rounds (the normalized row, then its product with the weight), so they agree bit for bit."""
    if h.dtype == torch.float32:
        variance = h.pow(2).mean(-1, keepdim=True)
        return weight * (h * torch.rsqrt(variance + eps))
    fused = _fused_for(h, weight) if h.is_contiguous() else None
    if fused is not None:
        return fused.rms_norm(h, weight, eps)
    return F.rms_norm(h, (h.shape[-1],), None, eps) * weight  # rounded before the weight, as transformers


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: ``(h + delta, rms_norm(h + delta))``. With the fused CPU kernel
    ``h`` is updated in place (the caller must own it) and both happen in one call; the sum is rounded to
    ``h``'s dtype exactly as ``h + delta`` is."""
    fused = _fused_for(h, delta, weight) if h.is_contiguous() and delta.is_contiguous() else None
    if fused is not None and delta.shape == h.shape:
        return h, fused.add_rms_norm(h, delta, weight, eps)
    h = h + delta
    return h, rms_norm(h, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's ``silu(gate) * up`` from the gate/up projection's output ``[n, 2 I]`` (gate first).
    A 16-bit CPU tensor goes through the fused kernel (one call instead of a split, a silu and a multiply),
    rounded as those operators round."""
    fused = _fused_for(gate_up) if gate_up.dim() == 2 and gate_up.stride(-1) == 1 else None
    if fused is not None:
        return fused.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, layer_kv: torch.Tensor,
                  slots: torch.Tensor, heads: int, kv_heads: int, head_dim: int) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary on the q and k heads of ``qkv`` ``[n, (heads + 2 kv_heads) * head_dim]`` (:func:`rotate`, with
    ``cos`` / ``sin_signed`` ``[n, 1, head_dim]``), and the rotated k and the v written at ``slots`` of one
    layer's cache (:func:`engine.kv_cache.write_layer_kv`); returns ``(q, k, v)``, each ``[n, heads, head_dim]``
    shaped. A 16-bit CPU step does it all in one call of the fused kernel, rounded as the operators round."""
    n = qkv.shape[0]
    qk_dim = (heads + kv_heads) * head_dim
    v = qkv[:, qk_dim:].view(n, kv_heads, head_dim)
    # The kernel reads rows of qkv (a column slice of a padded output is fine) and whole cos/sin/cache tensors.
    rows_readable = qkv.dim() == 2 and qkv.stride(-1) == 1
    whole = all(t.is_contiguous() for t in (cos, sin_signed, layer_kv))
    fused = _fused_for(qkv, cos, sin_signed, layer_kv) if rows_readable and whole else None
    if fused is not None:
        qk = fused.rope_write_kv(qkv, cos, sin_signed, layer_kv, slots, heads, kv_heads)
    else:
        qk = rotate(qkv[:, :qk_dim].view(n, heads + kv_heads, head_dim), cos, sin_signed)
        write_layer_kv(layer_kv, slots, qk[:, heads:], v)
    return qk[:, :heads], qk[:, heads:], v


def _fused_for(*tensors: torch.Tensor):
    """The fused operators when they apply to ``tensors`` (one 16-bit dtype, CPU, eager), else None; each
    caller checks the layout its operator needs."""
    dtype = tensors[0].dtype
    if dtype not in FUSED_DTYPES or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors) \
            or torch.compiler.is_compiling():  # the compiled decode step keeps torch's operators
        return None
    return fused_cpu_ops()


@functools.cache
def fused_cpu_ops():
    """``torch.ops.splitserve_cpu`` when its fused operators (RMSNorm, rotary + KV write) are built here
    (:mod:`engine.cpu_kernels`), else None and one warning (torch's operators compute the same, in more calls)."""
    problem = load_cpu_kernels()
    if problem is not None:
        log.warning("fused RMSNorm / rotary kernels unavailable, torch's operators are used instead: %s", problem)
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
