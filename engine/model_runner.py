"""The model forward over one scheduled step, reading and writing paged KV.

All tokens of a step (decode tokens and prefill chunks of different
lengths) are packed into one ``[num_tokens, hidden]`` tensor: the linear
layers, norms and MLPs run once over the pack, with no padding. Only
attention is per sequence kind:

- decoding sequences (one new token each) attend together: on the CPU with a
  16-bit cache a kernel reads each one's blocks in place through its block
  table (:mod:`engine.paged_attention`); otherwise their blocks are gathered
  through a padded block-table tensor and masked by length;
- prefill chunks attend one sequence at a time, causally, to everything the
  sequence has computed so far (earlier chunks are read back from the cache).

The forward is the engine's own Llama forward over
:class:`~engine.llama_weights.LlamaWeights` (fused QKV and gate/up
projections in the loaded format, a precomputed rotary table): about a
dozen operations per layer. Its float32 arithmetic is bit-identical to the
reference's (``transformers``' RMSNorm, rotary and MLP formulas,
:mod:`engine.llama_ops`), which keeps greedy output token-identical to
``generate()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.compiled_decode import CompiledDecode
from engine.decode_attention import (UPCAST_MAX_BATCH, gather_heads_major, heads_major_attention, sdpa_attention,
                                     upcast_sdpa_attention)
from engine.decode_layers import DecodeLayers
from engine.kv_cache import KVLayout, PagedKVCache
from engine.kv_cache_manager import KVCacheManager
from engine.llama_ops import add_rms_norm, rms_norm, rope_write_kv, rotate, silu_mul
from engine.llama_weights import LlamaWeights
from engine.paged_attention import paged_decode_kernel
from engine.scheduler import ScheduledChunk


@dataclass
class _Prefill:
    row: int        # first row in the packed batch
    num_tokens: int
    start: int      # position of the first token
    ctx_slots: torch.Tensor | None  # slots of positions [0, start + num_tokens) when start > 0


@dataclass
class _Decode:
    """The decoding sequences, packed first: rows ``[0, B)`` of the step."""

    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    flat_blocks: torch.Tensor   # block_tables.flatten()
    ctx_mask: torch.Tensor      # [B, 1, 1, max_blocks * block_size], True = attend
    context_lens: torch.Tensor  # [B] int64: keys each sequence attends to (its new token's included)


@dataclass
class _Batch:
    token_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    decode: _Decode | None
    prefills: list[_Prefill]
    sample_rows: torch.Tensor
    sample_chunks: list[ScheduledChunk]


def kv_layout_of(model) -> KVLayout:
    """The KV layout of a Hugging Face model run in its own dtype."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, dtype)


class ModelRunner:
    """Runs a Llama-family model's :class:`LlamaWeights` over packed steps with a paged KV cache."""

    def __init__(self, weights: LlamaWeights, cache: PagedKVCache, compile_decode: bool = False,
                 paged_kernel: bool = True, fused_layers: bool = True) -> None:
        if weights.kv_layout != cache.layout:
            raise ValueError(f"KV cache layout {cache.layout} does not match the weights' {weights.kv_layout}")
        self.w = weights
        self.cache = cache
        self.block_size = cache.block_size
        self.layout = cache.layout
        self.num_heads = weights.num_heads
        self.num_kv_heads = weights.num_kv_heads
        self.head_dim = weights.head_dim
        self.q_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self._positions = torch.arange(weights.rope_cos.shape[0])  # reused: no per-step arange
        # A 16-bit cache on the CPU decodes through engine.decode_attention (SDPA's CPU kernel is slow for
        # one query in 16 bits); float32, the exactness reference, and other devices keep SDPA.
        self.sdpa_decode = cache.layout.dtype == "float32" or weights.device.type != "cpu"
        # A 16-bit CPU cache is read in place by engine.paged_attention's kernel (no gather), where it builds;
        # paged_kernel=False keeps the gather path (the benchmarks compare the two).
        self.paged_decode = paged_decode_kernel() if paged_kernel and not self.sdpa_decode else None
        # Decode-only steps through one compiled graph per batch bucket; CPU only (the inductor C++
        # backend is what was measured; any other device keeps the eager forward).
        self.compiled = CompiledDecode(weights, cache) if compile_decode and weights.device.type == "cpu" else None
        # Decode-only steps' layers in one C++ call where every operator is the project's own (int4 on the
        # vnni kernel, the paged kernel): the same operators as the loop below, without its Python work.
        # fused_layers=False keeps the loop.
        self.fused_layers = DecodeLayers.for_weights(weights, cache) \
            if fused_layers and self.paged_decode is not None and self.compiled is None else None

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], kv: KVCacheManager) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """Compute ``chunks``; return the chunks that sample and their logits ``[S, vocab]``."""
        if self.compiled is not None and all(c.num_tokens == 1 and c.start > 0 and c.samples for c in chunks):
            return chunks, self.compiled(
                [c.seq.token_ids[c.start] for c in chunks], [c.start for c in chunks],
                [kv.slot(c.seq.request_id, c.start) for c in chunks],
                [kv.block_table(c.seq.request_id) for c in chunks])
        w = self.w
        batch = self._build_batch(chunks, kv)
        h = w.embed.index_select(0, batch.token_ids)
        n = h.shape[0]
        cos = w.rope_cos.index_select(0, batch.positions)[:, None, :]  # [n, 1, hd]: broadcast over heads
        sin = w.rope_sin_signed.index_select(0, batch.positions)[:, None, :]
        if self.fused_layers is not None and batch.decode is not None and not batch.prefills:
            h = self.fused_layers(h, cos, sin, batch.slots, batch.decode.block_tables, batch.decode.context_lens)
            return batch.sample_chunks, self._logits(h, batch)
        residual = None  # the last layer's MLP output, added to h inside the next norm (one fused call)
        for layer_idx, layer in enumerate(w.layers):
            if residual is None:
                x = rms_norm(h, layer.input_norm, w.eps)
            else:
                h, x = add_rms_norm(h, residual, layer.input_norm, w.eps)
            # Rotary on q and k together, and this step's K/V into the cache (one fused call when 16-bit on CPU).
            q, k, v = rope_write_kv(layer.qkv(x), cos, sin, self.cache.layers[layer_idx], batch.slots,
                                    self.num_heads, self.num_kv_heads, self.head_dim)
            o = self._attention(layer_idx, q, k, v, batch)
            h, x = add_rms_norm(h, layer.o(o.reshape(n, -1)), layer.post_norm, w.eps)
            residual = layer.down(silu_mul(layer.gate_up(x)))
        return batch.sample_chunks, self._logits(h + residual, batch)

    def _logits(self, h: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """The sampling rows of the last layer's output ``h``: final norm, then the LM head."""
        w = self.w
        return w.lm_head(rms_norm(h.index_select(0, batch.sample_rows), w.final_norm, w.eps))

    def _attention(self, layer_idx: int, q, k, v, batch: _Batch) -> torch.Tensor:
        out = None
        if batch.decode is not None:
            od = self._decode_attention(layer_idx, q[:batch.decode.block_tables.shape[0]], batch.decode)
            if not batch.prefills:
                return od
            out = torch.empty_like(q)
            out[:od.shape[0]] = od  # decode rows come first in the pack
        return self._prefill_attention(layer_idx, q, k, v, batch, torch.empty_like(q) if out is None else out)

    def _decode_attention(self, layer_idx: int, q: torch.Tensor, d: _Decode) -> torch.Tensor:
        """Attention of the decode rows ``q`` ``[B, H, D]`` over their sequences' paged K/V."""
        if self.paged_decode is not None:  # in place: each sequence's blocks read where they lie
            return self.paged_decode(q, self.cache.layers[layer_idx], d.block_tables, d.context_lens,
                                     self.block_size, self.scale)
        # One copy of whole blocks, every head's K and V at once (the cache is heads-major).
        b = q.shape[0]
        kh, vh = gather_heads_major(self.cache.blocks_view(layer_idx), d.flat_blocks, b)
        if self.sdpa_decode:
            return sdpa_attention(q, kh, vh, d.ctx_mask, self.scale)
        if b > UPCAST_MAX_BATCH:  # engine.decode_attention: the many-rows path
            return heads_major_attention(q, kh, vh, d.ctx_mask, self.scale)
        return upcast_sdpa_attention(q, kh, vh, d.ctx_mask, self.scale)

    def _prefill_attention(self, layer_idx: int, q, k, v, batch: _Batch, out: torch.Tensor) -> torch.Tensor:
        """Each prefill chunk's attention into its rows of ``out``, causally, over what its sequence has computed.

        A later chunk reads its sequence's earlier keys by one ``index_select`` per K and V: beside the
        chunk's own matmuls that copy is small (it is the decode rows, one query each, for which a gather
        per step cost as much as the attention itself).
        """
        layer_kv = self.cache.layers[layer_idx]
        for p in batch.prefills:
            rows = slice(p.row, p.row + p.num_tokens)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
            if p.ctx_slots is None:  # first chunk: the keys are exactly this chunk's
                kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
                mask, causal = None, True
            else:  # the cache is heads-major: [KV, keys, hd] as SDPA reads it
                kp, vp = layer_kv[0].index_select(1, p.ctx_slots), layer_kv[1].index_select(1, p.ctx_slots)
                key_pos = self._positions[:kp.shape[1]]
                query_pos = self._positions[p.start:p.start + p.num_tokens]
                mask, causal = key_pos[None, :] <= query_pos[:, None], False
            op = F.scaled_dot_product_attention(
                qp, kp.unsqueeze(0), vp.unsqueeze(0), attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True
            )
            out[rows] = op[0].transpose(0, 1)
        return out

    def _build_batch(self, chunks: list[ScheduledChunk], kv: KVCacheManager) -> _Batch:
        bs = self.block_size
        decodes = [c for c in chunks if c.num_tokens == 1 and c.start > 0]
        prefills = [c for c in chunks if not (c.num_tokens == 1 and c.start > 0)]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_chunks: list[ScheduledChunk] = []
        decode = None
        if decodes:
            tables = [kv.block_table(c.seq.request_id) for c in decodes]
            max_blocks = max(len(t) for t in tables)
            padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
            ctx = torch.tensor([c.start + 1 for c in decodes])
            mask = self._slot_range(max_blocks * bs)[None, :] < ctx[:, None]
            decode = _Decode(padded, padded.flatten(), mask[:, None, None, :], ctx)
        for c in decodes:
            tok_pos = c.start
            if c.samples:  # a one-token prefill chunk can also land here
                sample_rows.append(len(token_ids))
                sample_chunks.append(c)
            token_ids.append(c.seq.token_ids[tok_pos])
            positions.append(tok_pos)
            slots.append(kv.slot(c.seq.request_id, tok_pos))
        prefill_meta = []
        for c in prefills:
            row = len(token_ids)
            end = c.start + c.num_tokens
            table = torch.tensor(kv.block_table(c.seq.request_id), dtype=torch.long)
            all_slots = (table[:, None] * bs + self._slot_range(bs)[None, :]).flatten()[:end]
            token_ids.extend(c.seq.token_ids[c.start:end])
            positions.extend(range(c.start, end))
            slots.extend(all_slots[c.start:end].tolist())
            prefill_meta.append(_Prefill(row, c.num_tokens, c.start, all_slots if c.start > 0 else None))
            if c.samples:
                sample_rows.append(row + c.num_tokens - 1)
                sample_chunks.append(c)
        return _Batch(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slots=torch.tensor(slots, dtype=torch.long),
            decode=decode,
            prefills=prefill_meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long),
            sample_chunks=sample_chunks,
        )

    def _slot_range(self, n: int) -> torch.Tensor:
        """``arange(n)`` from a reused buffer (grown when a longer one is asked for)."""
        if n > self._positions.shape[0]:
            self._positions = torch.arange(n)
        return self._positions[:n]


@torch.inference_mode()
def sequence_logits(weights: LlamaWeights, token_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, vocab]`` at every position of one sequence, no KV cache (perplexity).

    The same weights, projections, norms and rotary as :class:`ModelRunner`; attention is one causal SDPA.
    """
    w = weights
    n = token_ids.shape[0]
    h = w.embed.index_select(0, token_ids)
    positions = torch.arange(n, device=token_ids.device)
    cos = w.rope_cos.index_select(0, positions)[:, None, :]
    sin = w.rope_sin_signed.index_select(0, positions)[:, None, :]
    hq, hkv, hd = w.num_heads, w.num_kv_heads, w.head_dim
    qk_dim = (hq + hkv) * hd
    for layer in w.layers:
        qkv = layer.qkv(rms_norm(h, layer.input_norm, w.eps))
        qk = rotate(qkv[:, :qk_dim].view(n, hq + hkv, hd), cos, sin)
        q, k = qk[:, :hq].transpose(0, 1), qk[:, hq:].transpose(0, 1)
        v = qkv[:, qk_dim:].view(n, hkv, hd).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=hd**-0.5,
                                           enable_gqa=True)
        h = h + layer.o(o[0].transpose(0, 1).reshape(n, -1))
        h = h + layer.down(silu_mul(layer.gate_up(rms_norm(h, layer.post_norm, w.eps))))
    return w.lm_head(rms_norm(h, w.final_norm, w.eps))
