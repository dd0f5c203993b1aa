"""Attention of one new token per sequence over its gathered paged K/V, heads-major.

On the CPU a 16-bit cache is read in place by :mod:`engine.paged_attention`'s
kernel instead, where it builds; the paths here serve a float32 cache (the
exactness reference), other devices, the compiled decode step, and a CPU
where the kernel cannot be built.

The paged cache is heads-major (:class:`engine.kv_cache.PagedKVCache`), so
:func:`gather_heads_major` copies each sequence's blocks for K, V and every
head with one ``index_select`` of whole blocks, into ``[KV, B, L, D]``: the
layout the batched products below read as they are.

For a 16-bit cache ``F.scaled_dot_product_attention`` on the CPU runs a query
of length one through its flash kernel, which is slow for that shape.
Measured on this 2-core CPU (SmolLM2-135M: 9 query / 3 KV heads, ~270 keys,
bfloat16 cache; one layer, gather included, medians of 5 interleaved rounds,
2 threads; µs; ``python -m benchmarks.decode_attention``):

=====  ==========  ===============  ========  ===============================
batch  SDPA, bf16  SDPA on float32  products  products, token-major cache
=====  ==========  ===============  ========  ===============================
1      157         86               101       143
8      1089        433              339       432
64     8263        3413             2299      2785
=====  ==========  ===============  ========  ===============================

So up to :data:`UPCAST_MAX_BATCH` rows the gathered K/V are converted to
float32 and go through SDPA's float32 kernel (:func:`upcast_sdpa_attention`);
above it two batched matmuls over (KV head, sequence) take each KV head's
query group at once, so K/V are never repeated per query head, with the
softmax in float32 (:func:`heads_major_attention`). The runner picks the path
by batch: whole int4/bfloat16 decode steps run 1.3-2.5x faster than through
SDPA (batch 8: 45.5 -> 23.2 ms; batch 64: 308 -> 124 ms). The last column is
the cache's previous token-major layout (one strided copy per head): the
heads-major layout gains 1.2-1.4x a layer, whole int4 steps at batch 8 and
32 1.2x (one thread: 27.7 -> 22.7 and 81.9 -> 67.7 ms). A float32 cache keeps
plain SDPA: float32 is the exactness reference, and its arithmetic stays the
one ``generate()`` runs.
"""


from __future__ import annotations

import torch
import torch.nn.functional as F

UPCAST_MAX_BATCH = 2  # see the table above


def gather_heads_major(blocks: torch.Tensor, flat_blocks: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``batch`` sequences out of one layer's paged ``blocks`` ``[2, KV, num_blocks, block_size, D]``
    (:meth:`engine.kv_cache.PagedKVCache.blocks_view`; each sequence's ``flat_blocks`` in order, padded
    alike), as ``[KV, batch, L, D]`` each.

    The cache is heads-major, so one ``index_select`` copies whole blocks of one head (``block_size * D``
    contiguous values) for K and V and every head at once, straight into the layout the products read.
    """
    two, kv_heads, num_blocks, block_size, dim = blocks.shape
    out = blocks.reshape(two * kv_heads, num_blocks, block_size * dim).index_select(1, flat_blocks)
    k, v = out.view(2, kv_heads, batch, -1, dim).unbind(0)
    return k, v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, D]`` over ``k``, ``v`` ``[KV, B, L, D]`` (``H`` a multiple of ``KV``;
    ``mask`` boolean, broadcastable to ``[B, KV, H // KV, L]``, True = attend) through SDPA in their own
    dtype (a float32 cache, and any GPU); ``[B, H, D]``."""
    return F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                          scale=scale, enable_gqa=True).squeeze(2)


def upcast_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """:func:`sdpa_attention` on float32 copies of ``q``, ``k``, ``v``; ``[B, H, D]`` in ``v``'s dtype."""
    return sdpa_attention(q.float(), k.float(), v.float(), mask, scale).to(v.dtype)


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
    """:func:`heads_major_attention`'s arithmetic as two einsums, for the compiled decode step (inductor
    fuses the reshapes into the products); ``k``, ``v`` ``[KV, B, L, D]``; ``[B, H, D]`` in ``v``'s dtype."""
    b, heads, dim = q.shape
    kv_heads = k.shape[0]
    grouped = q.view(b, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bkgd,kbld->bkgl", grouped, k).float() * scale
    probs = torch.softmax(scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf")), dim=-1).to(v.dtype)
    return torch.einsum("bkgl,kbld->bkgd", probs, v).reshape(b, heads, dim)
