"""The decode attention paths for 16-bit caches against float32 SDPA with a padding mask."""

import pytest
import torch
import torch.nn.functional as F

from engine.decode_attention import gather_heads_major, heads_major_attention, sdpa_attention, upcast_sdpa_attention


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("path", [sdpa_attention, upcast_sdpa_attention])
def test_matches_sdpa_with_gqa_and_padding(dtype, tol, batch, path):
    gen = torch.Generator().manual_seed(batch)
    heads, kv_heads, dim, keys = 9, 3, 64, 48
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    k = torch.randn(batch, keys, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(batch, keys, kv_heads, dim, generator=gen).to(dtype)
    lengths = torch.tensor([keys - 7 * i for i in range(batch)])
    mask = (torch.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]
    # padded keys hold garbage a wrong mask would let through
    k = k.masked_fill(~mask[:, 0, 0, :, None, None], 1e3)
    scale = dim**-0.5
    ref = F.scaled_dot_product_attention(q.float().unsqueeze(2), k.float().transpose(1, 2), v.float().transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=True).squeeze(2)
    out = path(q, k, v, mask, scale)
    assert out.shape == (batch, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("batch", [3, 5])
def test_heads_major_gather_and_attention_match_the_plain_gather_and_sdpa(batch):
    gen = torch.Generator().manual_seed(batch)
    heads, kv_heads, dim, block_size, num_blocks, per_seq = 6, 2, 16, 4, 40, 3
    blocks = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen)[:batch * per_seq].view(batch, per_seq)
    keys = per_seq * block_size
    lengths = torch.tensor([keys - i for i in range(batch)])
    mask = (torch.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]
    q = torch.randn(batch, heads, dim, generator=gen).to(torch.bfloat16)
    kh, vh = gather_heads_major(blocks, tables.flatten(), batch)
    assert kh.shape == (kv_heads, batch, keys, dim)
    k = blocks[0].index_select(0, tables.flatten()).view(batch, keys, kv_heads, dim)
    v = blocks[1].index_select(0, tables.flatten()).view(batch, keys, kv_heads, dim)
    torch.testing.assert_close(kh, k.permute(2, 0, 1, 3))
    torch.testing.assert_close(heads_major_attention(q, kh, vh, mask, dim**-0.5).float(),
                               upcast_sdpa_attention(q, k, v, mask, dim**-0.5).float(), atol=2e-2, rtol=2e-2)
