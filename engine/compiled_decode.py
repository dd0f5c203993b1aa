"""A decode-only step's layers through one compiled graph (``torch.compile``, the inductor backend).

A decode step of the eager :class:`~engine.model_runner.ModelRunner` is about
twenty operators per layer, each a Python call and a dispatch; with small or
quantized weights that overhead, not memory traffic, sets the step time.
Here one decoder layer of a decode step — both norms, the fused projections,
rotary, the KV write into the paged cache, the gather of each sequence's
blocks and attention, the MLP and both residuals — is one function, compiled by
inductor into a few fused C++ loops around the matmul and attention kernels.
Every layer has the same shapes, so the one compiled graph serves all of
them: compile time does not grow with the model's depth.

The batch and the context (blocks in the table) are dynamic dimensions: one
graph serves every batch size above one and every context length (batch 1
gets its own graph, as do the sizes where a quantized format switches kernel,
:data:`engine.quant.INT8_PACKED_MAX_ROWS`). Compilation happens the first time
a shape class is met, or all at once in :meth:`CompiledDecode.warm_up`
(the engine calls it when it is built, so no request waits for a compiler);
:attr:`CompiledDecode.compile_seconds` keeps how long each first call took. The embedding lookup and the LM head stay eager (one
operator each).

The KV write goes through :func:`kv_write`, a custom operator that declares
the cache it mutates. Written as ``index_copy_`` on a view of the graph
input, it was functionalized into a copy of the whole layer cache per layer
and step (two buffers of every slot): a batch-1 step over a cache sized for
64 sequences took 320 ms instead of ~12. Attention follows the eager
runner's choice for the cache's dtype (:mod:`engine.decode_attention`):
SDPA for float32, SDPA on float32 copies at batch 1 for a 16-bit cache, and
the grouped products with a float32 softmax above it.

Only decode-only steps on the CPU take this path; prefill and mixed steps,
and every other device, run the eager forward (nothing CPU-only reaches a
GPU). Float32 output is token-identical to ``generate()`` (tested).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from engine.decode_attention import gather_heads_major, grouped_attention, sdpa_attention, upcast_sdpa_attention
from engine.format_names import UNCOMPILABLE_QUANTIZATIONS
from engine.kv_cache import PagedKVCache, write_layer_kv
from engine.llama_ops import rms_norm, rotate
from engine.llama_weights import LayerWeights, LlamaWeights

log = logging.getLogger(__name__)

# A block table is padded to at least this many blocks (the padding masked out): with one block the
# context dimension would be specialized to a single block and every longer context recompile.
MIN_BLOCKS = 2
RECOMPILE_LIMIT = 64  # graphs of decode_layer one process may hold (formats x shape classes)


@torch.library.custom_op("splitserve::kv_write", mutates_args=("layer_kv",))
def kv_write(layer_kv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """:func:`engine.kv_cache.write_layer_kv` as an operator of its own, so that a compiled graph mutates the
    cache instead of copying it."""
    write_layer_kv(layer_kv, slots, k, v)


def decode_layer(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, flat_blocks: torch.Tensor,
                 slots: torch.Tensor, layer_kv: torch.Tensor, layer: LayerWeights, eps: float, num_heads: int,
                 block_size: int) -> torch.Tensor:
    """One layer of a decode step: ``h`` ``[B, hidden]`` in, ``h`` out; K/V of the new tokens written at ``slots``.

    The eager runner's decode arithmetic (:class:`engine.model_runner.ModelRunner`), op for op.
    ``layer_kv`` is ``[2, kv_heads, slots, head_dim]``; ``flat_blocks`` the block tables ``[B, M]``
    flattened; ``mask`` ``[B, 1, 1, M * block_size]`` (True: attend).
    """
    b = h.shape[0]
    hkv, hd = layer_kv.shape[1], layer_kv.shape[3]
    qk_dim = (num_heads + hkv) * hd
    qkv = layer.qkv(rms_norm(h, layer.input_norm, eps))
    qk = rotate(qkv[:, :qk_dim].view(b, num_heads + hkv, hd), cos, sin)
    q, k = qk[:, :num_heads], qk[:, num_heads:]
    v = qkv[:, qk_dim:].view(b, hkv, hd)
    kv_write(layer_kv, slots, k, v)
    kd, vd = gather_heads_major(layer_kv.view(2, hkv, -1, block_size, hd), flat_blocks, b)
    if layer_kv.dtype == torch.float32:  # the exactness reference: SDPA, as the eager runner
        o = sdpa_attention(q, kd, vd, mask, hd**-0.5)
    elif b == 1:  # shape classes split batch 1 from the rest: no recompilation (the eager runner upcasts up to 2)
        o = upcast_sdpa_attention(q, kd, vd, mask, hd**-0.5)
    else:
        o = grouped_attention(q, kd, vd, mask, hd**-0.5)
    h = h + layer.o(o.reshape(b, -1))
    gate, up = layer.gate_up(rms_norm(h, layer.post_norm, eps)).chunk(2, dim=-1)
    return h + layer.down(F.silu(gate) * up)


class CompiledDecode:
    """The decode forward of ``weights`` over the paged ``cache``, its layers compiled (module docstring)."""

    def __init__(self, weights: LlamaWeights, cache: PagedKVCache) -> None:
        if weights.fmt.quantization in UNCOMPILABLE_QUANTIZATIONS:
            raise ValueError(f"compile: the {weights.fmt.quantization} format's kernel cannot be traced by "
                             "torch.compile; run it eager (compile=False)")
        self.w = weights
        self.cache = cache
        self.compile_seconds: dict[str, float] = {}
        # Graphs are cached per code object: every engine of the process (one per weight format in a
        # benchmark, each with two or three shape classes) adds to one list, which must not overflow
        # into a silent eager fallback.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._layer = torch.compile(decode_layer, fullgraph=True)
        self._key_range = torch.arange(0)  # grown on demand: no per-step arange

    def shape_class(self, batch: int) -> str:
        """Which compiled graph a batch of ``batch`` decode rows runs (one per class, see the module docstring)."""
        kinds = {type(lin).__name__ for layer in self.w.layers[:1] for lin in (layer.qkv, layer.o)}
        if batch == 1:
            return "batch 1"
        if "Int8Linear" in kinds:
            from engine.quant import INT8_PACKED_MAX_ROWS
            return f"batch 2-{INT8_PACKED_MAX_ROWS - 1}" if batch < INT8_PACKED_MAX_ROWS else \
                f"batch {INT8_PACKED_MAX_ROWS}+"
        return "batch 2+"

    def warm_up(self) -> dict[str, float]:
        """Compile every shape class now, with one throw-away step each (``compile_seconds`` afterwards).

        Call it before the cache holds anything: the throw-away rows write K/V into the first slots,
        which no sequence owns yet (each later owner writes its own before reading them)."""
        from engine.quant import INT8_PACKED_MAX_ROWS

        slots = self.cache.num_blocks * self.cache.block_size
        for b in (1, 2, INT8_PACKED_MAX_ROWS):
            if b <= slots and self.shape_class(b) not in self.compile_seconds:
                self(token_ids=[0] * b, positions=[0] * b, slots=list(range(b)), block_tables=[[0]] * b)
        return dict(self.compile_seconds)

    @torch.inference_mode()  # as the runner's forward: a graph compiled under another grad mode would not match
    def __call__(self, token_ids: list[int], positions: list[int], slots: list[int],
                 block_tables: list[list[int]]) -> torch.Tensor:
        """Logits ``[len(token_ids), vocab]`` of one decode step (row i: the sequence with ``block_tables[i]``,
        its new token ``token_ids[i]`` at ``positions[i]``, written to ``slots[i]``)."""
        w, bs = self.w, self.cache.block_size
        b = len(token_ids)
        m = max(MIN_BLOCKS, *(len(t) for t in block_tables))
        tables = torch.tensor([t + [0] * (m - len(t)) for t in block_tables], dtype=torch.long)
        pos = torch.tensor(positions, dtype=torch.long)
        slot = torch.tensor(slots, dtype=torch.long)
        ctx = pos + 1
        if self._key_range.shape[0] < m * bs:
            self._key_range = torch.arange(max(m * bs, 2 * self._key_range.shape[0]))
        mask = (self._key_range[:m * bs][None, :] < ctx[:, None])[:, None, None, :]
        flat = tables.flatten()
        h = w.embed.index_select(0, torch.tensor(token_ids, dtype=torch.long))
        cos = w.rope_cos.index_select(0, pos)[:, None, :]
        sin = w.rope_sin_signed.index_select(0, pos)[:, None, :]
        for t, dim in ((h, 0), (cos, 0), (sin, 0), (slot, 0), (flat, 0), (mask, 0), (mask, 3)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        key = self.shape_class(b)
        first = key not in self.compile_seconds
        t0 = time.perf_counter()
        for layer, layer_kv in zip(w.layers, self.cache.layers):
            h = self._layer(h, cos, sin, mask, flat, slot, layer_kv, layer, w.eps, w.num_heads, bs)
            if first:  # the first layer's call compiled the graph
                self.compile_seconds[key] = time.perf_counter() - t0
                log.info("compiled the decode layer for %s in %.1f s", key, self.compile_seconds[key])
                first = False
        return w.lm_head(rms_norm(h, w.final_norm, w.eps))
