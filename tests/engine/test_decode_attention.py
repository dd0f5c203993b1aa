"""The grouped decode attention against SDPA with a padding mask (the path it replaces for 16-bit caches)."""

import pytest
import torch
import torch.nn.functional as F

from engine.decode_attention import grouped_decode_attention


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3])  # both paths: upcast SDPA up to UPCAST_MAX_BATCH, einsum above
def test_matches_sdpa_with_gqa_and_padding(dtype, tol, batch):
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
    out = grouped_decode_attention(q, k, v, mask, scale)
    assert out.shape == (batch, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
