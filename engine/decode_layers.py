"""A decode-only step's decoder layers in one call of the CPU library (``engine/csrc/decode_layers.cpp``).

The eager runner calls some fifteen operators a layer from Python; at batch 1 on SmolLM2 that interpreter
and dispatch work (~2 ms a step) is a third of the step. ``decode_layers`` calls the same operators, in the
same order, from C++: the logits are bit for bit the eager runner's, the per-layer Python work is gone.

It applies where every operator it calls is the project's own: a CPU, a 16-bit KV cache read by the paged
kernel, and every projection an :class:`~engine.quant.Int4Linear` on the ``vnni`` kernel without a bias (the
int4 formats on an AVX512-VNNI or AVX2 CPU, the default deployment's). Elsewhere :meth:`DecodeLayers.for_weights`
returns None and the runner keeps its Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.cpu_kernels import load_cpu_kernels
from engine.kv_cache import PagedKVCache
from engine.llama_ops import FUSED_DTYPES
from engine.llama_weights import LlamaWeights
from engine.quant import Int4Linear

PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the operator's order within a layer


def _vnni_int4(linear) -> bool:
    return isinstance(linear, Int4Linear) and linear.kernel == "vnni" and linear.bias is None


@dataclass(frozen=True)
class DecodeLayers:
    """The per-layer tensors ``decode_layers`` takes, gathered once from :class:`LlamaWeights`."""

    norms: tuple[torch.Tensor, ...]    # input, post per layer
    packed: tuple[torch.Tensor, ...]   # PROJECTIONS per layer
    scales: tuple[torch.Tensor, ...]
    n_out: tuple[int, ...]             # per projection
    layer_kvs: tuple[torch.Tensor, ...]
    block_size: int
    scale: float
    heads: int
    kv_heads: int
    eps: float

    @classmethod
    def for_weights(cls, weights: LlamaWeights, cache: PagedKVCache) -> DecodeLayers | None:
        """The fused layers for ``weights`` over ``cache``, or None where they do not apply (module docstring)."""
        w = weights
        if w.device.type != "cpu" or w.fmt.torch_dtype not in FUSED_DTYPES or cache.layout.dtype != w.fmt.dtype:
            return None
        if not all(_vnni_int4(getattr(layer, p)) for layer in w.layers for p in PROJECTIONS):
            return None
        if load_cpu_kernels() is not None:
            return None
        n_out = tuple(getattr(w.layers[0], p).out_features for p in PROJECTIONS)
        if any(getattr(layer, p).out_features != n for layer in w.layers for p, n in zip(PROJECTIONS, n_out)):
            return None
        return cls(
            norms=tuple(t for layer in w.layers for t in (layer.input_norm, layer.post_norm)),
            packed=tuple(getattr(layer, p).packed for layer in w.layers for p in PROJECTIONS),
            scales=tuple(getattr(layer, p).scales for layer in w.layers for p in PROJECTIONS),
            n_out=n_out,
            layer_kvs=tuple(cache.layers),
            block_size=cache.block_size,
            scale=w.head_dim**-0.5,
            heads=w.num_heads,
            kv_heads=w.num_kv_heads,
            eps=w.eps,
        )

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, slots: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """``h`` ``[n, hidden]`` (the embedded decode tokens) after every layer; writes each layer's K/V at
        ``slots``. ``cos`` / ``sin_signed``: the rows' rotary tables, ``[n, head_dim]`` elements each."""
        return torch.ops.splitserve_cpu.decode_layers(
            h, self.norms, self.packed, self.scales, self.n_out, cos, sin_signed, self.layer_kvs, slots,
            block_tables, context_lens, self.block_size, self.scale, self.heads, self.kv_heads, self.eps)
