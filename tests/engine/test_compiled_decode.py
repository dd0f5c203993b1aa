"""The compiled decode step (engine.compiled_decode) on builtin:tiny-llama: float32 greedy output equal to
generate() through batch 1, larger batches and mixed steps, with the compiled graphs actually used.

The compile cost (two graphs of one tiny layer, some seconds) is paid once, by this module."""

from __future__ import annotations

import random

from torch._dynamo.utils import counters

from engine.llm_engine import LLMEngine
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
