"""analysis.cost_model against hand-computed figures, and against real HF models' parameter counts.

The toy model used throughout: 2 layers, hidden 8, intermediate 12, 4 query
heads and 2 KV heads of head_dim 2, vocab 10, untied. By hand:

    q_dim = 4 * 2 = 8, kv_dim = 2 * 2 = 4
    one layer's matrices: q 8*8=64, k 8*4=32, v 8*4=32, o 8*8=64   -> 192
                          gate 8*12=96, up 96, down 96              -> 288
                          total                                      480
    one layer with its two RMSNorms: 480 + 2*8 = 496
    embedding 10*8 = 80, lm_head 10*8 = 80
    non-embedding: 2 layers * 496 + final norm 8 = 1000
    param_count untied: 80 + 1000 + 80 = 1160; tied: 1080
    matmul params (what a token multiplies through): 2*480 + 80 = 1040
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from analysis.cost_model import ModelDims, arithmetic_intensity, dtype_bytes, roofline_seconds
from analysis.machine_peaks import MachinePeaks, measure_peaks

REPO = Path(__file__).resolve().parents[2]

TOY = ModelDims(num_layers=2, hidden_size=8, intermediate_size=12, num_heads=4, num_kv_heads=2, head_dim=2,
                vocab_size=10)


def test_param_counts_by_hand():
    assert TOY.layer_matmul_params() == 480
    assert TOY.layer_params() == 496
    assert TOY.non_embedding_params() == 1000
    assert TOY.matmul_params() == 1040
    assert TOY.param_count() == 1160
    tied = ModelDims(**{**TOY.__dict__, "tie_word_embeddings": True})
    assert tied.param_count() == 1080            # the shared matrix counted once
    assert tied.matmul_params() == 1040          # but a token still multiplies through lm_head


def test_param_bytes_per_dtype():
    assert TOY.param_bytes(4) == 4640            # 1160 * 4
    assert TOY.param_bytes(2) == 2320            # 1160 * 2
    assert TOY.param_bytes(1) == 1160
    assert TOY.param_bytes(0.5) == 580           # int4: two weights a byte
    assert dtype_bytes("bfloat16") == dtype_bytes("bf16") == 2
    assert dtype_bytes("torch.float32") == 4
    assert dtype_bytes("int4") == 0.5
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_bytes("fp6")


def test_biases():
    # Qwen2: q, k, v biases = 8 + 4 + 4 = 16 per layer -> 1160 + 2*16 = 1192.
    qwen = ModelDims(**{**TOY.__dict__, "qkv_bias": True})
    assert qwen.param_count() == 1192
    # Llama attention_bias adds o's bias too (8): 1160 + 2*(16 + 8) = 1208.
    assert ModelDims(**{**TOY.__dict__, "qkv_bias": True, "o_bias": True}).param_count() == 1208
    # mlp_bias: gate 12 + up 12 + down 8 = 32 per layer -> 1160 + 64 = 1224.
    assert ModelDims(**{**TOY.__dict__, "mlp_bias": True}).param_count() == 1224


def test_kv_bytes_per_token_and_cache():
    assert TOY.kv_bytes_per_token(2) == 32       # 2 (K and V) * 2 layers * 4 (kv_dim) * 2 bytes
    assert TOY.kv_bytes_per_token(4) == 64
    assert TOY.kv_cache_bytes(batch=3, context_len=5, dtype_bytes=2) == 480   # 3 * 5 * 32


def test_decode_step_by_hand():
    nbytes, flops = TOY.decode_step(batch=3, context_len=5, dtype_bytes=2)
    # bytes: weights (non-embedding 1000 + lm_head 80 + 3 rows * 8) * 2 = 2208, plus KV read 3 * 5 * 32 = 480
    assert nbytes == 2688
    # FLOPs per token: 2 * 1040 = 2080 matmul + attention 4 * ctx 5 * layers 2 * heads 4 * head_dim 2 = 320
    assert flops == 3 * 2400
    assert TOY.flops_per_token(5) == 2400


def test_prefill_by_hand():
    nbytes, flops = TOY.prefill([3, 2], dtype_bytes=2)
    # bytes: weights (1000 + 80 + 5 rows * 8) * 2 = 2240, plus KV written 5 tokens * 32 = 160
    assert nbytes == 2400
    # FLOPs: layers' matrices 2 * (2 * 480) * 5 tokens = 9600; lm_head for each last row 2 * 80 * 2 = 320;
    # causal pairs 3*4/2 + 2*3/2 = 9, attention 4 * 9 * 2 layers * 4 heads * 2 = 576
    assert flops == 9600 + 320 + 576


def test_kv_in_its_own_dtype():
    # int4 weights with an fp8 cache: KV 16 bytes/token instead of 32, weights unchanged
    assert TOY.decode_step(3, 5, 2, kv_dtype_bytes=1)[0] == 2208 + 3 * 5 * 16
    assert TOY.prefill([3, 2], 2, kv_dtype_bytes=1)[0] == 2240 + 5 * 16
    assert TOY.decode_step(3, 5, 2, kv_dtype_bytes=1)[1] == TOY.decode_step(3, 5, 2)[1]   # FLOPs do not care


def test_decode_context_matches_prefill_attention():
    # Prefilling 3 tokens = attention of token 1, 2 and 3 over 1, 2, 3 keys: the decode formula summed.
    _, p = TOY.prefill([3], 2)
    attn_prefill = p - 2 * 2 * 480 * 3 - 2 * 80
    assert attn_prefill == sum(TOY.attention_flops(c) for c in (1, 2, 3))


def test_intensity_and_roofline():
    assert arithmetic_intensity(100, 2500) == 25
    # 100 bytes at 10 B/s = 10 s; 2500 FLOPs at 1000 FLOP/s = 2.5 s -> bandwidth-bound, 10 s
    assert roofline_seconds(100, 2500, 10, 1000) == (10, "bandwidth")
    # 100 bytes at 1000 B/s = 0.1 s; 2500 FLOPs at 100 FLOP/s = 25 s -> compute-bound
    assert roofline_seconds(100, 2500, 1000, 100) == (25, "compute")
    assert MachinePeaks(bandwidth_bytes_per_s=2e12, flops_per_s=1e15).ridge_point == 500


def test_from_hf_config_defaults():
    # No head_dim, no num_key_value_heads: head_dim = 8 // 4 = 2, multi-head attention.
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=8, intermediate_size=12, num_attention_heads=4,
                          vocab_size=10, head_dim=None)
    dims = ModelDims.from_hf_config(cfg)
    assert (dims.head_dim, dims.num_kv_heads, dims.tie_word_embeddings) == (2, 4, False)
    qwen = ModelDims.from_hf_config(SimpleNamespace(**cfg.__dict__, model_type="qwen2", num_key_value_heads=2))
    assert (qwen.qkv_bias, qwen.o_bias, qwen.num_kv_heads) == (True, False, 2)


def test_rejects_bad_dims():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelDims(2, 8, 12, 4, 3, 2, 10)
    with pytest.raises(ValueError, match="num_layers"):
        ModelDims(0, 8, 12, 4, 2, 2, 10)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_param_count_matches_real_hf_models(model_type):
    """The formula against ``sum(p.numel())`` of real (tiny, random) transformers models."""
    import transformers

    cls_config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig}[model_type]
    cls_model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[model_type]
    for tied in (False, True):
        cfg = cls_config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        model = cls_model(cfg)
        unique = {p.data_ptr(): p.numel() for p in model.parameters()}
        assert ModelDims.from_hf_config(model.config).param_count() == sum(unique.values()), (model_type, tied)


def test_tiny_llama_counts_and_kv_layout(tiny_model):
    from engine.model_runner import kv_layout_of

    dims = ModelDims.from_hf_config(tiny_model.config)
    params = list(tiny_model.model.parameters())
    assert dims.param_count() == sum(p.numel() for p in params)
    assert dims.kv_bytes_per_token(4) == kv_layout_of(tiny_model.model).bytes_per_token


def test_analysis_imports_neither_torch_nor_the_layers_above():
    """Every analysis module imports without torch and without any package above analysis."""
    modules = sorted(p.stem for p in (REPO / "analysis").glob("*.py") if p.stem != "__init__")
    assert {"cost_model", "machine_peaks", "hardware", "bottleneck", "model_catalog"} <= set(modules)
    code = (f"import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module('analysis.' + m)\n"
            "above = ('torch', 'engine', 'kvtransfer', 'worker_common', 'prefill_worker', 'decode_worker',\n"
            "         'observability', 'router', 'cluster', 'benchmarks')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in above)\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_fast_peaks_are_positive_and_quick():
    import time

    t0 = time.perf_counter()
    peaks = measure_peaks(reps=1, copy_bytes=8 * 1024 * 1024, matmul_n=256)
    assert time.perf_counter() - t0 < 5   # generous: the machine is shared
    assert peaks.bandwidth_bytes_per_s > 1e8 and peaks.flops_per_s > 1e8


def test_a_16_bit_model_is_measured_against_the_bfloat16_matmul_peak():
    from analysis.machine_peaks import peak_dtype

    assert [peak_dtype(d) for d in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "bfloat16"]
    peaks = measure_peaks(reps=1, copy_bytes=8 * 1024 * 1024, matmul_n=256, dtype="bfloat16")
    assert peaks.flops_per_s > 1e8
