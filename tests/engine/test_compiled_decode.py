"""The compiled decode step (engine.compiled_decode) on builtin:tiny-llama: float32 greedy output equal to
generate() through batch 1, larger batches and mixed steps, with the compiled graphs actually used; the 16-bit
paths against the eager forward; the KV write in place.

The compile cost (graphs of one tiny layer, some seconds each) is paid by this module."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from engine.compiled_decode import CompiledDecode
from engine.llm_engine import LLMEngine, run_to_completion
from engine.model_loader import TINY_MODEL, load_model
from engine.quant import Int4Linear, int4_vnni_available
from engine.sampling_params import SamplingParams
from worker_common.worker_config import DecodeEngineConfig
from tests.reference import Comparison, compare_greedy


def test_compiled_float32_decode_is_token_identical_to_generate(tiny_model):
    rng = random.Random(7)
    prompts = [[rng.randrange(0, 256) for _ in range(rng.randrange(3, 40))] for _ in range(6)]
    max_new = 16
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=128, max_running=8, max_batched_tokens=64, compile=True)
    assert engine.runner.compiled is not None
    # Built: every graph compiled up front; no step may compile another (contexts grow, batches change).
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    assert set(engine.runner.compiled.compile_seconds) == {"batch 1", "batch 2+"}
    params = SamplingParams(max_tokens=max_new, ignore_eos=True)
    # One request alone first (batch-1 decode steps), then the rest join while it decodes (mixed steps,
    # eager), then decode together (batch 2+).
    engine.add_request("r0", params=params, prompt_token_ids=prompts[0])
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    steps = 0
    while engine.has_unfinished():
        if steps == 4:
            for i in range(1, len(prompts)):
                engine.add_request(f"r{i}", params=params, prompt_token_ids=prompts[i])
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        steps += 1
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up
    total = Comparison()
    for i, p in enumerate(prompts):
        total.add(compare_greedy(tiny_model.model, p, got[f"r{i}"], max_new, ignore_eos=True))
    assert total.exact + total.near_ties == len(prompts)
    assert total.near_ties <= 1, f"{total.near_ties} near-ties is more than float noise explains"


def test_the_decode_pool_setting_reaches_the_engine(tiny_model):
    args = DecodeEngineConfig(compile=True, num_blocks=8).engine_args()
    assert args["compile"] is True
    engine = LLMEngine(tiny_model, **{**args, "compile": False})
    assert engine.runner.compiled is None  # off: the eager forward only


def _greedy(engine: LLMEngine, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", params=params, prompt_token_ids=p)
    done = run_to_completion(engine)
    return [done[f"r{i}"].token_ids for i in range(len(prompts))]


def test_compiled_16_bit_decode_agrees_with_the_eager_forward(monkeypatch):
    """int4/bfloat16 (the deployment's decode format): batch 1 (SDPA on float32 copies) and batch 2+ (the grouped
    products) agree with the eager runner's arithmetic (the same paths, but for batch 2, which it upcasts).

    On torch's int4 kernel (float products): the VNNI kernel quantizes activations to int8, which turns the
    compiled graph's other roundings into flipped near-ties of this random model from the first decode step;
    that kernel's compiled call is checked exactly below."""
    monkeypatch.setattr("engine.quant.int4_kernel_for", lambda device, group_size: "torch")
    loaded = load_model(TINY_MODEL, dtype="bfloat16", quantization="int4")
    assert loaded.weights.layers[0].qkv.kernel == "torch"
    rng = random.Random(3)
    prompts = [[rng.randrange(0, 256) for _ in range(rng.randrange(3, 40))] for _ in range(5)]
    alone = prompts[:1]
    kwargs = dict(block_size=4, num_blocks=128, max_running=8, max_batched_tokens=256)
    compiled = LLMEngine(loaded, **kwargs, compile=True)
    eager = LLMEngine(loaded, **kwargs)
    graphs_before = counters["stats"]["unique_graphs"]
    for batch in (alone, prompts):
        got, ref = _greedy(compiled, batch, 12), _greedy(eager, batch, 12)
        # A random-weight model in bf16 has near-ties; the fused kernels round differently: the first tokens agree.
        assert all(g[:2] == r[:2] for g, r in zip(got, ref)), (got, ref)
        assert sum(g == r for g, r in zip(got, ref)) >= len(batch) - 1
    assert counters["stats"]["unique_graphs"] == graphs_before  # warm-up compiled both shape classes


def test_the_compiled_graph_writes_the_kv_cache_in_place():
    """The graph holds no buffer the size of the layer cache: the KV write mutates the cache, never a copy of it
    (as ``index_copy_`` on a view of the input it copied every slot of the layer, per layer and step)."""
    loaded = load_model(TINY_MODEL, dtype="bfloat16", quantization="int4")
    num_blocks, block_size = 37, 4  # 148 slots: a size no other tensor of the graph has
    engine = LLMEngine(loaded, block_size=block_size, num_blocks=num_blocks, max_running=2, max_batched_tokens=64)
    compiled = CompiledDecode(engine.runner.w, engine.runner.cache)
    torch._dynamo.reset()  # compile afresh, so that the code is generated here
    _, codes = run_and_get_code(compiled, token_ids=[1], positions=[0], slots=[0], block_tables=[[0]])
    slots = num_blocks * block_size
    code = "\n".join(codes)
    assert f"empty_strided_cpu(({slots}," not in code, "the compiled decode layer copies the KV cache"
    assert "kv_write" in code


@pytest.mark.skipif(not int4_vnni_available(), reason="no AVX512-VNNI kernel here")
def test_the_vnni_int4_kernel_compiles_to_the_same_numbers_and_decodes_alone_like_eager():
    """The project's int4 operator traces (its fake gives the output shape) and computes bit for bit what it
    computes eagerly; a compiled batch-1 decode on it gives the eager engine's tokens."""
    lin = Int4Linear(torch.randn(96, 64) * 0.05, None, torch.bfloat16, 32, kernel="vnni")
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(torch.compile(lambda t: lin(t) * 2, dynamic=False)(x), lin(x) * 2)
    loaded = load_model(TINY_MODEL, dtype="bfloat16", quantization="int4")
    assert loaded.weights.layers[0].qkv.kernel == "vnni"
    kwargs = dict(block_size=4, num_blocks=128, max_running=8, max_batched_tokens=256)
    prompt = [[random.Random(3).randrange(0, 256) for _ in range(17)]]
    got = _greedy(LLMEngine(loaded, **kwargs, compile=True), prompt, 12)
    assert got == _greedy(LLMEngine(loaded, **kwargs), prompt, 12)
