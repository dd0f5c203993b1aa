"""The decode attention paths over heads-major K/V against float32 SDPA with a padding mask."""

import pytest
import torch
import torch.nn.functional as F

from engine.decode_attention import (gather_heads_major, grouped_attention, heads_major_attention, sdpa_attention,
                                     upcast_sdpa_attention)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("path", [sdpa_attention, upcast_sdpa_attention, heads_major_attention,
                                  grouped_attention])
def test_matches_sdpa_with_gqa_and_padding(dtype, tol, batch, path):
    gen = torch.Generator().manual_seed(batch)
    heads, kv_heads, dim, keys = 9, 3, 64, 48
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    k = torch.randn(kv_heads, batch, keys, dim, generator=gen).to(dtype)  # heads-major, as gathered
    v = torch.randn(kv_heads, batch, keys, dim, generator=gen).to(dtype)
    lengths = torch.tensor([keys - 7 * i for i in range(batch)])
    mask = (torch.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]
    # padded keys hold garbage a wrong mask would let through
    k = k.masked_fill(~mask[None, :, 0, 0, :, None], 1e3)
    scale = dim**-0.5
    ref = F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float().transpose(0, 1), v.float().transpose(0, 1),
                                         attn_mask=mask, scale=scale, enable_gqa=True).squeeze(2)
    if path in (heads_major_attention, grouped_attention) and dtype == torch.float32:
        tol = 1e-4  # a float32 softmax over float32 products: not SDPA's arithmetic, the same within rounding
    out = path(q, k, v, mask, scale)
    assert out.shape == (batch, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("batch", [3, 5])
def test_the_heads_major_gather_reads_each_sequences_blocks_in_order(batch):
    gen = torch.Generator().manual_seed(batch)
    heads, kv_heads, dim, block_size, num_blocks, per_seq = 6, 2, 16, 4, 40, 3
    cache = torch.randn(2, kv_heads, num_blocks * block_size, dim, generator=gen).to(torch.bfloat16)  # one layer
    blocks = cache.view(2, kv_heads, num_blocks, block_size, dim)
    tables = torch.randperm(num_blocks, generator=gen)[:batch * per_seq].view(batch, per_seq)
    keys = per_seq * block_size
    kh, vh = gather_heads_major(blocks, tables.flatten(), batch)
    assert kh.shape == vh.shape == (kv_heads, batch, keys, dim)
    for s in range(batch):  # sequence s's keys: its blocks' slots, in table order
        slots = (tables[s][:, None] * block_size + torch.arange(block_size)[None, :]).flatten()
        assert torch.equal(kh[:, s], cache[0][:, slots]) and torch.equal(vh[:, s], cache[1][:, slots])
    lengths = torch.tensor([keys - i for i in range(batch)])
    mask = (torch.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]
    q = torch.randn(batch, heads, dim, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(heads_major_attention(q, kh, vh, mask, dim**-0.5).float(),
                               upcast_sdpa_attention(q, kh, vh, mask, dim**-0.5).float(), atol=2e-2, rtol=2e-2)
