"""Attention of one new token per sequence over its gathered paged K/V, for caches kept in a
16-bit dtype.

``F.scaled_dot_product_attention`` on the CPU runs a 16-bit query of length
one through its flash kernel, which is slow for that shape. Measured on this
2-core CPU (SmolLM2-135M: 9 query / 3 KV heads, ~270 keys, bfloat16 cache;
one layer, gather included, medians of 7 interleaved rounds; µs):

=========  ===========  ==================  ====================
batch      SDPA, bf16   SDPA on float32     grouped einsum, bf16
=========  ===========  ==================  ====================
1          342          167                 316
8          1855         1095                613
64         17083        7583                5673
=========  ===========  ==================  ====================

So up to :data:`UPCAST_MAX_BATCH` rows the gathered K/V are converted to
float32 and go through SDPA's float32 kernel (:func:`upcast_sdpa_attention`);
above it, K/V are gathered heads-major (:func:`gather_heads_major`, one copy)
and two batched matmuls over (KV head, sequence) take each KV head's query
group at once, so K/V are never repeated per query head, with the softmax in
float32 (:func:`heads_major_attention`; the benchmark's grouped einsum is
the same product over the plain gather, one copy more). The runner picks the
path by batch. Whole int4/bfloat16 decode steps got 1.5-2.2x faster (batch
8: 76 -> 53 ms; batch 64: 683 -> 312 ms; ``python -m
benchmarks.decode_attention``). A float32 cache keeps plain SDPA: float32 is
the exactness reference, and its arithmetic stays the one ``generate()`` runs.
"""


from __future__ import annotations

import torch
import torch.nn.functional as F

UPCAST_MAX_BATCH = 2  # see the table above


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, D]`` over ``k``, ``v`` ``[B, L, KV, D]`` (``H`` a multiple of ``KV``;
    ``mask`` boolean, broadcastable to ``[B, KV, H // KV, L]``, True = attend) through SDPA in their own
    dtype (a float32 cache, and any GPU); ``[B, H, D]``."""
    return F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          scale=scale, enable_gqa=True).squeeze(2)


def upcast_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """:func:`sdpa_attention` on float32 copies of ``q``, ``k``, ``v``; ``[B, H, D]`` in ``v``'s dtype."""
    return sdpa_attention(q.float(), k.float(), v.float(), mask, scale).to(v.dtype)


def gather_heads_major(blocks: torch.Tensor, flat_blocks: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``batch`` sequences out of one layer's paged ``blocks`` ``[2, num_blocks, block_size, KV, D]``
    (each sequence's ``flat_blocks`` in order, padded alike), as ``[KV, batch, L, D]`` each.

    One ``index_select`` per KV head writes each head's rows contiguously, so the products of
    :func:`heads_major_attention` read them as they are: no second copy to bring the heads outward
    (an einsum over ``[B, L, KV, D]`` makes one; this measured 20-25 % faster a layer at batch >= 8).
    """
    kv_heads, dim = blocks.shape[3], blocks.shape[4]
    out = torch.empty((2, kv_heads, flat_blocks.shape[0], blocks.shape[2], dim), dtype=blocks.dtype,
                      device=blocks.device)
    for which in range(2):
        for h in range(kv_heads):
            torch.index_select(blocks[which, :, :, h], 0, flat_blocks, out=out[which, h])
    k, v = out.view(2, kv_heads, batch, -1, dim).unbind(0)
    return k, v


def heads_major_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, D]`` over ``k``, ``v`` ``[KV, B, L, D]`` (:func:`gather_heads_major`;
    ``mask`` as for :func:`sdpa_attention`) by two batched matmuls over (KV head, sequence), each KV head's
    query group at once, softmax in float32; ``[B, H, D]`` in ``v``'s dtype."""
    b, heads, dim = q.shape
    kv_heads, _, keys, _ = k.shape
    group = heads // kv_heads
    grouped = q.reshape(b, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads * b, group, dim)
    scores = torch.bmm(grouped, k.reshape(kv_heads * b, keys, dim).transpose(1, 2)).float()
    scores = (scores * scale).view(kv_heads, b, group, keys)
    probs = torch.softmax(scores.masked_fill(~mask.reshape(1, b, 1, keys), float("-inf")), dim=-1).to(v.dtype)
    out = torch.bmm(probs.view(kv_heads * b, group, keys), v.reshape(kv_heads * b, keys, dim))
    return out.view(kv_heads, b, group, dim).transpose(0, 1).reshape(b, heads, dim)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """:func:`heads_major_attention`'s arithmetic over the plain gather ``[B, L, KV, D]``, for the
    compiled decode step (inductor fuses the layout change into the products); ``[B, H, D]`` in ``v``'s dtype."""
    b, heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.view(b, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bkgd,blkd->bkgl", grouped, k).float() * scale
    probs = torch.softmax(scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf")), dim=-1).to(v.dtype)
    return torch.einsum("bkgl,blkd->bkgd", probs, v).reshape(b, heads, dim)
