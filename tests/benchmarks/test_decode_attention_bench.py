"""benchmarks.decode_attention: its layer measurement runs every path on a small shape, and the token-major
variant it compares the cache layout against gathers the same K/V as the engine's heads-major gather."""

import torch

from benchmarks.decode_attention import layer_attention, token_major_gather
from engine.decode_attention import gather_heads_major
from engine.paged_attention import paged_decode_kernel


def test_layer_attention_times_every_path():
    for batch in (1, 4):
        r = layer_attention(batch, heads=4, kv_heads=2, head_dim=16, rounds=1)
        expected = {"sdpa_bf16", "sdpa_fp32", "heads_major", "token_major"}
        assert set(r) == expected | ({"in_place"} if paged_decode_kernel() is not None else set())
        assert all(us > 0 for us in r.values())


def test_the_token_major_variant_gathers_what_the_engine_gathers():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(2, 3, 20, 4, 8, generator=gen).to(torch.bfloat16)  # [2, KV, blocks, block_size, D]
    flat = torch.tensor([7, 2, 9, 4, 0, 11])
    old_k, old_v = token_major_gather(blocks.permute(0, 2, 3, 1, 4).contiguous(), flat, 2)
    k, v = gather_heads_major(blocks, flat, 2)
    assert torch.equal(old_k, k) and torch.equal(old_v, v)
