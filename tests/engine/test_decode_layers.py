"""The decode step's layers in one C++ call (engine.decode_layers): bit for bit the eager loop's logits, used
for decode-only steps only, applied only where every operator it calls is the project's own, and its
arguments checked."""

from __future__ import annotations

import random

import pytest
import torch

from engine.decode_layers import DecodeLayers
from engine.llm_engine import LLMEngine, run_to_completion
from engine.model_loader import TINY_MODEL, load_model
from engine.quant import int4_vnni_available
from engine.sampling_params import SamplingParams

needs_vnni = pytest.mark.skipif(not int4_vnni_available(), reason="no AVX512-VNNI kernel here")
ENGINE_ARGS = dict(block_size=4, num_blocks=256, max_running=8, max_batched_tokens=256)


@pytest.fixture(scope="module")
def int4_tiny():
    return load_model(TINY_MODEL, dtype="bfloat16", quantization="int4")


def _add(engine: LLMEngine, name: str, length: int, seed: int, max_tokens: int = 10) -> None:
    rng = random.Random(seed)
    engine.add_request(name, params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                       prompt_token_ids=[rng.randrange(0, 256) for _ in range(length)])


@needs_vnni
def test_fused_layers_give_the_loops_logits_bit_for_bit_and_only_on_decode_only_steps(int4_tiny):
    engine = LLMEngine(int4_tiny, **ENGINE_ARGS)
    runner = engine.runner
    fused = runner.fused_layers
    assert fused is not None
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return DecodeLayers.__call__(fused, *args)

    execute = runner.execute
    compared = {"decode-only": 0, "mixed": 0}

    def both_paths(chunks, kv):
        # The loop first, then the fused call over the same step: both write the same K/V at the same slots.
        runner.fused_layers = None
        _, loop_logits = execute(chunks, kv)
        runner.fused_layers = counted
        before = len(calls)
        sampled, logits = execute(chunks, kv)
        decode_only = all(c.num_tokens == 1 and c.start > 0 for c in chunks)
        assert len(calls) - before == (1 if decode_only else 0)
        assert torch.equal(logits, loop_logits)
        compared["decode-only" if decode_only else "mixed"] += 1
        return sampled, logits

    runner.execute = both_paths
    _add(engine, "a", 9, 1)
    for _ in range(3):
        engine.step()
    _add(engine, "b", 23, 2)  # joins while "a" decodes: a mixed step, then both decode (lengths differ)
    _add(engine, "c", 5, 3)
    while engine.has_unfinished():
        engine.step()
    assert compared["decode-only"] >= 5 and compared["mixed"] >= 1
    assert max(calls) == 3


@needs_vnni
def test_greedy_tokens_are_the_same_with_and_without_the_fused_layers(int4_tiny):
    def run(fused: bool) -> dict[str, list[int]]:
        engine = LLMEngine(int4_tiny, **ENGINE_ARGS)
        if not fused:
            engine.runner.fused_layers = None
        for i in range(4):
            _add(engine, f"r{i}", 3 + 7 * i, 10 + i, max_tokens=12)
        return {name: seq.token_ids for name, seq in run_to_completion(engine).items()}

    fused, loop = run(True), run(False)
    assert fused == loop and len(fused) == 4


@pytest.mark.parametrize("dtype,quantization,kernel", [
    ("float32", "none", None), ("bfloat16", "none", None), ("bfloat16", "int8", None),
    ("bfloat16", "int4", "torch")])
def test_no_fused_layers_where_an_operator_is_not_the_projects(dtype, quantization, kernel, monkeypatch):
    if kernel is not None:
        monkeypatch.setattr("engine.quant.int4_kernel_for", lambda device, group_size: kernel)
    loaded = load_model(TINY_MODEL, dtype=dtype, quantization=quantization)
    engine = LLMEngine(loaded, **ENGINE_ARGS)
    assert engine.runner.fused_layers is None


@needs_vnni
def test_the_operator_refuses_lists_that_do_not_match_the_layers(int4_tiny):
    engine = LLMEngine(int4_tiny, **ENGINE_ARGS)
    f = engine.runner.fused_layers
    h = torch.zeros(1, int4_tiny.weights.hidden_size, dtype=torch.bfloat16)
    rows = torch.zeros(1, int4_tiny.weights.head_dim, dtype=torch.bfloat16)
    args = dict(cos=rows, sin_signed=rows, slots=torch.zeros(1, dtype=torch.long),
                block_tables=torch.zeros(1, 1, dtype=torch.long), context_lens=torch.ones(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="norms must hold 2 per layer"):
        DecodeLayers(**{**f.__dict__, "norms": f.norms[:-1]})(h, **args)
    with pytest.raises(RuntimeError, match="packed and scales must hold 4 per layer"):
        DecodeLayers(**{**f.__dict__, "scales": f.scales[:-1]})(h, **args)
    with pytest.raises(RuntimeError, match="n_out must hold 4"):
        DecodeLayers(**{**f.__dict__, "n_out": f.n_out[:3]})(h, **args)
