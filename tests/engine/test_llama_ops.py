"""The engine's RMSNorm and rotary against ``transformers``' own modules: bit-identical in float32 (the
exactness reference), within one rounding in bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from engine.llama_ops import rms_norm, rotate, signed_sin


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_rms_norm_is_transformers_bit_for_bit_in_float32(gen):
    h = torch.randn(7, 576, generator=gen) * 3
    hf = LlamaRMSNorm(576, eps=1e-5)
    hf.weight.data = torch.rand(576, generator=gen) + 0.5
    with torch.no_grad():
        assert torch.equal(rms_norm(h, hf.weight.data, 1e-5), hf(h))


def test_rms_norm_in_bfloat16_is_within_one_rounding_of_transformers(gen):
    h = (torch.randn(7, 576, generator=gen) * 3).bfloat16()
    hf = LlamaRMSNorm(576, eps=1e-5).bfloat16()
    hf.weight.data = (torch.rand(576, generator=gen) + 0.5).bfloat16()
    with torch.no_grad():
        ours, theirs = rms_norm(h, hf.weight.data, 1e-5).float(), hf(h).float()
    # transformers rounds twice (normalised, then times the weight), the fused call once
    assert ours.dtype == theirs.dtype and torch.allclose(ours, theirs, rtol=2 ** -7, atol=0)


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
