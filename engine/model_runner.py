"""The model forward over one scheduled step, reading and writing paged KV.

All tokens of a step (decode tokens and prefill chunks of different
lengths) are packed into one ``[num_tokens, hidden]`` tensor: the linear
layers, norms and MLPs run once over the pack, with no padding. Only
attention is per sequence kind:

- decoding sequences (one new token each) attend together: their blocks
  are gathered through a padded block-table tensor and masked by length;
- prefill chunks attend one sequence at a time, causally, to everything the
  sequence has computed so far (earlier chunks are read back from the cache).

The layers themselves (projections, RMSNorm, MLP, rotary embedding) are the
Hugging Face modules of the loaded model, so the arithmetic is the
reference's; this module only replaces the KV cache and attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.kv_cache import KVLayout, PagedKVCache
from engine.kv_cache_manager import KVCacheManager
from engine.scheduler import ScheduledChunk


@dataclass
class _Prefill:
    row: int        # first row in the packed batch
    num_tokens: int
    start: int      # position of the first token
    ctx_slots: torch.Tensor | None  # slots of positions [0, start + num_tokens) when start > 0


@dataclass
class _Decode:
    rows: torch.Tensor          # [B] packed rows
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    flat_blocks: torch.Tensor   # block_tables.flatten()
    ctx_mask: torch.Tensor      # [B, 1, 1, max_blocks * block_size], True = attend


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
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, dtype)


class ModelRunner:
    """Runs a Llama-family HF model over packed steps with a paged KV cache."""

    def __init__(self, model, cache: PagedKVCache) -> None:
        cfg = model.config
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.layout = cache.layout
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = self.layout.head_dim
        self.scale = self.head_dim**-0.5
        self.decoder = model.model
        self.lm_head = model.lm_head

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], kv: KVCacheManager) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """Compute ``chunks``; return the chunks that sample and their logits ``[S, vocab]``."""
        batch = self._build_batch(chunks, kv)
        h = self.decoder.embed_tokens(batch.token_ids)
        cos, sin = self.decoder.rotary_emb(h, batch.positions[None])
        n = h.shape[0]
        for layer_idx, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, n, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(1, n, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
            q, k = q[0], k[0]
            layer_kv = self.cache.layers[layer_idx]
            layer_kv[0, batch.slots] = k
            layer_kv[1, batch.slots] = v
            o = self._attention(layer_idx, q, k, v, batch)
            h = h + attn.o_proj(o.reshape(n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = self.decoder.norm(h[batch.sample_rows])
        return batch.sample_chunks, self.lm_head(last)

    def _attention(self, layer_idx: int, q, k, v, batch: _Batch) -> torch.Tensor:
        out = torch.empty_like(q)
        if batch.decode is not None:
            d = batch.decode
            blocks = self.cache.blocks_view(layer_idx)
            # index_select, not blocks[0][tables]: advanced indexing takes a
            # slow generic path here (milliseconds instead of microseconds).
            b = d.block_tables.shape[0]
            kd = blocks[0].index_select(0, d.flat_blocks).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            vd = blocks[1].index_select(0, d.flat_blocks).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
            qd = q[d.rows].unsqueeze(2)  # [B, H, 1, hd]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=d.ctx_mask, scale=self.scale, enable_gqa=True)
            out[d.rows] = od.squeeze(2)
        layer_kv = self.cache.layers[layer_idx]
        for p in batch.prefills:
            rows = slice(p.row, p.row + p.num_tokens)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
            if p.ctx_slots is None:  # first chunk: the keys are exactly this chunk's
                kp, vp = k[rows], v[rows]
                mask, causal = None, True
            else:
                kp, vp = layer_kv[0].index_select(0, p.ctx_slots), layer_kv[1].index_select(0, p.ctx_slots)
                key_pos = torch.arange(kp.shape[0])
                query_pos = torch.arange(p.start, p.start + p.num_tokens)
                mask, causal = key_pos[None, :] <= query_pos[:, None], False
            kp = kp.transpose(0, 1).unsqueeze(0)
            vp = vp.transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True
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
            mask = torch.arange(max_blocks * bs)[None, :] < ctx[:, None]
            decode = _Decode(torch.arange(len(decodes)), padded, padded.flatten(), mask[:, None, None, :])
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
            all_slots = (table[:, None] * bs + torch.arange(bs)[None, :]).flatten()[:end]
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
