"""Attention of one new token per sequence over its gathered paged K/V, for caches kept in a
16-bit dtype.

``F.scaled_dot_product_attention`` on the CPU runs a 16-bit query of length
one through its flash kernel, which is slow for that shape: measured on this
2-core CPU (SmolLM2-135M, 9 query / 3 KV heads, ~270 keys, bfloat16), one
layer's decode attention took 0.2 / 1.4 / 11.7 ms at batch 1 / 8 / 64. Two
grouped ``einsum`` products (each KV head's query group at once, so the K/V
are never repeated per query head) with the softmax in float32 do the same in
about a tenth at batch 64, and whole int4/bfloat16 decode steps got 1.5-2.2x
faster (batch 1: 30 -> 20 ms; batch 8: 76 -> 53 ms; batch 64: 683 -> 312 ms).
A float32 cache keeps SDPA: float32 is the exactness reference, and its
arithmetic stays the one ``generate()`` runs.
"""

from __future__ import annotations

import torch


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, D]`` over ``k``, ``v`` ``[B, L, KV, D]`` (``H`` a multiple of ``KV``).

    ``mask`` is boolean, broadcastable to ``[B, KV, H // KV, L]`` (True = attend).
    Scores and softmax are float32; the result is ``[B, H, D]`` in ``v``'s dtype.
    """
    b, heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(b, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bkgd,blkd->bkgl", grouped, k).float() * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype)
    return torch.einsum("bkgl,blkd->bkgd", probs, v).reshape(b, heads, dim)
