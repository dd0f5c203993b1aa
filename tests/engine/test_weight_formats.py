"""Weight formats through the whole engine (tiny model): fused weights shared with the HF module in
float32, each format runs, quantized formats hold far fewer bytes, the KV cache takes the format's dtype."""

from __future__ import annotations

import pytest
import torch

from engine.llm_engine import LLMEngine, run_to_completion
from engine.model_loader import TINY_MODEL, load_model
from engine.quant import DenseLinear, Int4Linear, Int8Linear, W8A8Linear
from engine.sampling_params import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10] * 5, list(range(40, 100)), [3] * 17]


def _generate(loaded) -> list[list[int]]:
    engine = LLMEngine(loaded, num_blocks=64, block_size=4)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", params=SamplingParams(max_tokens=12, ignore_eos=True), prompt_token_ids=p)
    done = run_to_completion(engine)
    return [done[f"r{i}"].token_ids for i in range(len(PROMPTS))]


def test_float32_weights_are_fused_views_of_the_hf_module(tiny_model):
    w = tiny_model.weights
    attn = tiny_model.model.model.layers[0].self_attn
    assert isinstance(w.layers[0].qkv, DenseLinear)
    qkv = w.layers[0].qkv.weight
    assert qkv.shape[0] == attn.q_proj.weight.shape[0] + attn.k_proj.weight.shape[0] + attn.v_proj.weight.shape[0]
    # Shared storage: the HF module (generate(), the reference) reads the very tensors the engine does.
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attn.v_proj.weight.data_ptr() == qkv[-attn.v_proj.weight.shape[0]:].data_ptr()
    tied = tiny_model.model.lm_head.weight is tiny_model.model.model.embed_tokens.weight
    assert (w.lm_head.weight.data_ptr() == w.embed.data_ptr()) == tied  # a tied head is held once
    assert tiny_model.kv_layout.dtype == "float32"


@pytest.mark.parametrize(("dtype", "quantization", "linear"), [
    ("bfloat16", "none", DenseLinear), ("float32", "int8", Int8Linear), ("bfloat16", "int4", Int4Linear),
    ("bfloat16", "w8a8", W8A8Linear)])
def test_each_format_generates_and_shrinks(tiny_model, dtype, quantization, linear):
    loaded = load_model(TINY_MODEL, dtype=dtype, quantization=quantization)
    assert loaded.fmt.dtype == dtype and loaded.fmt.quantization == quantization
    assert isinstance(loaded.weights.layers[0].gate_up, linear)
    assert loaded.kv_layout.dtype == dtype
    engine = LLMEngine(loaded, num_blocks=8)
    assert engine.cache.layers[0].dtype == getattr(torch, dtype)
    out = _generate(loaded)
    assert [len(t) for t in out] == [12] * len(PROMPTS)
    # Fewer bytes than float32 for every reduced format (the projections alone, int4 < int8 < bf16 < fp32).
    assert loaded.weights.linear_bytes() < 0.55 * tiny_model.weights.linear_bytes()
    if quantization != "none":
        # The quantized copy replaced the HF module's projections: nothing held twice.
        assert loaded.model.model.layers[0].self_attn.q_proj.weight.numel() == 0


def test_bfloat16_agrees_with_float32_on_most_tokens(tiny_model):
    ref, got = _generate(tiny_model), _generate(load_model(TINY_MODEL, dtype="bfloat16"))
    # A random-weight model has near-ties everywhere; still, the first tokens must agree.
    assert all(r[:2] == g[:2] for r, g in zip(ref, got))


def test_unknown_formats_are_refused():
    with pytest.raises(ValueError, match="quantization"):
        load_model(TINY_MODEL, quantization="int2")
    with pytest.raises(ValueError, match="dtype"):
        load_model(TINY_MODEL, dtype="float8")


def test_the_compiled_decode_step_refuses_the_format_it_cannot_trace(tiny_model):
    loaded = load_model(TINY_MODEL, dtype="bfloat16", quantization="w8a8")
    with pytest.raises(ValueError, match="w8a8 format's kernel cannot be traced"):
        LLMEngine(loaded, num_blocks=8, compile=True)
