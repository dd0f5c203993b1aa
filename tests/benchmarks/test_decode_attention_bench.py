"""benchmarks.decode_attention: its layer measurement runs every path on a small shape, and the variant it
compares against (grouped einsums) computes the same attention as the engine's reference path."""

import pytest
import torch

from benchmarks.decode_attention import grouped_einsum_attention, layer_attention
from engine.decode_attention import upcast_sdpa_attention


def test_layer_attention_times_every_path():
    for batch in (1, 4):
        r = layer_attention(batch, heads=4, kv_heads=2, head_dim=16, rounds=1)
        assert set(r) == {"sdpa_bf16", "sdpa_fp32", "grouped_einsum", "heads_major"}
        assert all(us > 0 for us in r.values())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_grouped_einsum_variant_matches_the_engine_path(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, keys = 3, 9, 3, 64, 48
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    k = torch.randn(batch, keys, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(batch, keys, kv_heads, dim, generator=gen).to(dtype)
    lengths = torch.tensor([keys - 7 * i for i in range(batch)])
    mask = (torch.arange(keys)[None, :] < lengths[:, None])[:, None, None, :]
    k = k.masked_fill(~mask[:, 0, 0, :, None, None], 1e3)  # padded keys hold garbage a wrong mask would let through
    out = grouped_einsum_attention(q, k, v, mask, dim**-0.5)
    ref = upcast_sdpa_attention(q, k, v, mask, dim**-0.5)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
