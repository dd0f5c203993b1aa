"""Decode attention that reads the paged KV cache in place (a CPU kernel of our own).

:mod:`engine.decode_attention` gathers each sequence's blocks into a padded
``[KV, B, L, D]`` copy per layer, then multiplies. The kernel in
``engine/csrc/paged_attention.cpp`` walks each sequence's block table instead
and reads every key and value where it lies: nothing is copied, nothing is
padded to the longest sequence, and each KV head's query group is scored
together (one read of K and V per KV head). Scores, softmax and the weighted
sum are float32 for any cache dtype.

It is part of the project's CPU library (:mod:`engine.cpu_kernels`: built once with
``-march=native``, then loaded). Where it cannot be built (no compiler) :func:`paged_decode_kernel`
returns None and logs why once: the runner keeps the gather path, slower but
the same attention.

Measured per layer (SmolLM2-135M shapes: 9 query / 3 KV heads of 64, ~250
keys, bfloat16 cache, blocks scattered over the cache): see
``python -m benchmarks.decode_attention``.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

from engine.cpu_kernels import load_cpu_kernels

log = logging.getLogger(__name__)

PagedDecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


@functools.cache
def paged_decode_kernel() -> PagedDecodeKernel | None:
    """``torch.ops.splitserve_cpu.paged_decode_attention``, built or loaded once per process; None (and one
    warning) when it cannot be built here.

    The operator: ``(q [B, H, D], layer_kv [2, KV, slots, D], block_tables [B, M] int64, context_lens [B] int64,
    block_size, scale) -> [B, H, D]`` in ``q``'s dtype; CPU tensors; ``q`` and the cache of one dtype
    (float32, bfloat16 or float16). A context length outside ``[1, M * block_size]`` or a block index
    outside the cache raises ``RuntimeError`` before anything is read.
    """
    problem = load_cpu_kernels()
    if problem is not None:
        log.warning("paged attention kernel unavailable, decode attention gathers K/V instead: %s", problem)
        return None
    return torch.ops.splitserve_cpu.paged_decode_attention
