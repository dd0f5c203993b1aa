"""benchmarks.decode_attention's layer measurement runs every path on a small shape."""

from benchmarks.decode_attention import layer_attention


def test_layer_attention_times_every_path():
    for batch in (1, 4):
        r = layer_attention(batch, heads=4, kv_heads=2, head_dim=16, rounds=1)
        assert set(r) == {"sdpa_bf16", "sdpa_fp32", "grouped_einsum", "heads_major"}
        assert all(us > 0 for us in r.values())
