"""The engine's RMSNorm and rotary against ``transformers``' own modules: bit-identical in float32 (the
exactness reference); in bfloat16 rounded where transformers rounds, by the fused kernel and by its fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from engine import llama_ops
from engine.llama_ops import add_rms_norm, rms_norm, rope_write_kv, rotate, signed_sin, silu_mul


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_rms_norm_is_transformers_bit_for_bit_in_float32(gen):
    h = torch.randn(7, 576, generator=gen) * 3
    hf = LlamaRMSNorm(576, eps=1e-5)
    hf.weight.data = torch.rand(576, generator=gen) + 0.5
    with torch.no_grad():
        assert torch.equal(rms_norm(h, hf.weight.data, 1e-5), hf(h))


@pytest.fixture(params=["fused kernel", "torch fallback"])
def norm_path(request, monkeypatch) -> str:
    """Each 16-bit RMSNorm path: the project's fused CPU kernel, and torch's operators where it cannot build."""
    if request.param == "fused kernel":
        if llama_ops.fused_cpu_ops() is None:
            pytest.skip("the CPU kernels did not build here (see the log)")
    else:
        monkeypatch.setattr(llama_ops, "fused_cpu_ops", lambda: None)
    return request.param


def _hf_norm(gen, dtype=torch.bfloat16) -> LlamaRMSNorm:
    hf = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    hf.weight.data = (torch.rand(576, generator=gen) + 0.5).to(dtype)
    return hf


def _same_but_for_the_mean_order(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal, except where summing the squares in another order moved a value across a rounding boundary."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert (ours == theirs).float().mean().item() > 0.995
    assert torch.allclose(ours.float(), theirs.float(), rtol=2 ** -7, atol=0)


def test_rms_norm_in_bfloat16_rounds_where_transformers_rounds(gen, norm_path):
    h = (torch.randn(7, 576, generator=gen) * 3).bfloat16()
    hf = _hf_norm(gen)
    with torch.no_grad():
        _same_but_for_the_mean_order(rms_norm(h, hf.weight.data, 1e-5), hf(h))


def test_add_rms_norm_is_the_residual_add_then_the_norm(gen, norm_path):
    h = (torch.randn(3, 576, generator=gen) * 3).bfloat16()
    delta = torch.randn(3, 576, generator=gen).bfloat16()
    hf = _hf_norm(gen)
    expected_sum = h + delta
    h_in = h.clone()
    total, normed = add_rms_norm(h_in, delta, hf.weight.data, 1e-5)
    assert torch.equal(total, expected_sum)  # rounded exactly as `h + delta`
    if norm_path == "fused kernel":
        assert total.data_ptr() == h_in.data_ptr()  # updated in place: one call, no new residual tensor
    with torch.no_grad():
        _same_but_for_the_mean_order(normed, hf(expected_sum))


def test_both_16_bit_paths_agree_and_a_float32_residual_is_not_fused(gen):
    if llama_ops.fused_cpu_ops() is None:
        pytest.skip("the CPU kernels did not build here (see the log)")
    h = (torch.randn(4, 576, generator=gen) * 3).bfloat16()
    w = _hf_norm(gen).weight.data
    fused = torch.ops.splitserve_cpu.rms_norm(h, w, 1e-5)
    fallback = torch.nn.functional.rms_norm(h, (576,), None, 1e-5) * w
    _same_but_for_the_mean_order(fused, fallback)
    h32, d32 = h.float(), torch.randn(4, 576, generator=gen)
    total, _ = add_rms_norm(h32, d32, w.float(), 1e-5)
    assert total.data_ptr() != h32.data_ptr() and torch.equal(total, h32 + d32)  # float32: the reference ops
    with pytest.raises(RuntimeError, match="bfloat16 or float16 only"):
        torch.ops.splitserve_cpu.rms_norm(h32, w.float(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_transformers_rotary_bit_for_bit(gen, dtype):
    n, heads, kv_heads, hd = 5, 9, 3, 64
    q = torch.randn(1, heads, n, hd, generator=gen).to(dtype)
    k = torch.randn(1, kv_heads, n, hd, generator=gen).to(dtype)
    cos = torch.randn(1, n, hd, generator=gen).to(dtype)
    sin = torch.randn(1, n, hd, generator=gen).to(dtype)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    # the runner's layout: [tokens, heads, head_dim] with cos/sin [tokens, 1, head_dim]
    q_ours = rotate(q[0].transpose(0, 1), cos[0][:, None], signed_sin(sin[0])[:, None])
    k_ours = rotate(k[0].transpose(0, 1), cos[0][:, None], signed_sin(sin[0])[:, None])
    assert torch.equal(q_ours, q_ref[0].transpose(0, 1)) and torch.equal(k_ours, k_ref[0].transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_matches_rotate_and_write_layer_kv(gen, dtype, norm_path):
    from engine.kv_cache import write_layer_kv

    n, heads, kv_heads, hd, slots_in_cache = 6, 9, 3, 64, 40
    # The qkv projection's output may be a column slice of a padded kernel output: a row stride > width.
    padded = torch.randn(n, (heads + 2 * kv_heads) * hd + 16, generator=gen).to(dtype)
    qkv = padded[:, :(heads + 2 * kv_heads) * hd]
    positions = torch.tensor([0, 3, 7, 8, 20, 31])
    angles = torch.randn(64, hd, generator=gen)
    cos = angles.cos().to(dtype).index_select(0, positions)[:, None, :]
    sin = signed_sin(angles.sin().to(dtype)).index_select(0, positions)[:, None, :]
    slots = torch.tensor([5, 17, 2, 39, 0, 11])
    cache_ours = torch.zeros(2, kv_heads, slots_in_cache, hd, dtype=dtype)
    cache_ref = cache_ours.clone()
    q, k, v = rope_write_kv(qkv, cos, sin, cache_ours, slots, heads, kv_heads, hd)
    qk_ref = rotate(qkv[:, :(heads + kv_heads) * hd].reshape(n, heads + kv_heads, hd), cos, sin)
    v_ref = qkv[:, (heads + kv_heads) * hd:].reshape(n, kv_heads, hd)
    write_layer_kv(cache_ref, slots, qk_ref[:, heads:], v_ref)
    assert torch.equal(q, qk_ref[:, :heads]) and torch.equal(k, qk_ref[:, heads:]) and torch.equal(v, v_ref)
    assert torch.equal(cache_ours, cache_ref)  # the same slots written, nothing else touched


def test_the_fused_rotary_refuses_a_slot_outside_the_cache(gen):
    if llama_ops.fused_cpu_ops() is None:
        pytest.skip("the CPU kernels did not build here (see the log)")
    qkv = torch.randn(1, 15 * 64, generator=gen).bfloat16()
    cos = torch.ones(1, 1, 64).bfloat16()
    cache = torch.zeros(2, 3, 8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.splitserve_cpu.rope_write_kv(qkv, cos, cos, cache, torch.tensor([8]), 9, 3)
    assert not cache.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_rounds_as_torchs_silu_then_multiply(gen, dtype, norm_path):
    """silu(gate) * up from a gate/up output (and a column slice of a wider one): each 16-bit path against
    torch's operators, equal but where an exponential's last float32 bit moved a rounding (rare)."""
    wide = (torch.randn(37, 2 * 1536 + 64, generator=gen) * 4).to(dtype)
    for gate_up in (wide[:, :2 * 1536].contiguous(), wide[:, :2 * 1536]):
        got = silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        want = F.silu(gate) * up
        assert got.dtype == dtype and got.shape == (37, 1536)
        assert (got == want).float().mean().item() > 0.999
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=1e-3)
    f32 = torch.randn(3, 8, generator=gen)
    assert torch.equal(silu_mul(f32), F.silu(f32[:, :4]) * f32[:, 4:])


def test_the_fused_silu_mul_refuses_what_it_cannot_read(gen):
    if llama_ops.fused_cpu_ops() is None:
        pytest.skip("the CPU kernels did not build here (see the log)")
    with pytest.raises(RuntimeError, match="unit column stride"):
        torch.ops.splitserve_cpu.silu_mul(torch.zeros(4, 7, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16 or float16 only"):
        torch.ops.splitserve_cpu.silu_mul(torch.zeros(4, 8))
