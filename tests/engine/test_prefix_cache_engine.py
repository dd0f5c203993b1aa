"""Prefix caching in the engine on builtin:tiny-llama: greedy float32 output
with the cache on equals the cache off and generate(), with shared prefixes,
under preemption and with imported (partly cached) KV; blocks come back."""

from __future__ import annotations

import random

from engine.llm_engine import LLMEngine, run_to_completion
from engine.sampling_params import SamplingParams
from tests.reference import Comparison, compare_greedy

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


def shared_prefix_prompts(n: int, seed: int, prefix_len: int = 61) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(0, 256) for _ in range(prefix_len)]
    return [system + [rng.randrange(0, 256) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def run_staggered(engine: LLMEngine, prompts: list[list[int]], gap: int) -> dict[str, list[int]]:
    """Add one prompt every ``gap`` steps (so later ones find earlier ones cached); all outputs."""
    got = {f"r{i}": [] for i in range(len(prompts))}
    nxt, step = 0, 0
    while nxt < len(prompts) or engine.has_unfinished():
        if nxt < len(prompts) and step % gap == 0:
            engine.add_request(f"r{nxt}", params=PARAMS, prompt_token_ids=prompts[nxt])
            nxt += 1
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        step += 1
    return got


def test_cache_on_equals_cache_off_and_generate_and_blocks_come_back(tiny_model):
    prompts = shared_prefix_prompts(8, seed=5)
    on = LLMEngine(tiny_model, block_size=4, num_blocks=256, max_batched_tokens=64)
    off = LLMEngine(tiny_model, block_size=4, num_blocks=256, max_batched_tokens=64, prefix_caching=False)
    got_on, got_off = run_staggered(on, prompts, gap=3), run_staggered(off, prompts, gap=3)
    assert got_on == got_off
    total = Comparison()
    for i, p in enumerate(prompts):
        total.add(compare_greedy(tiny_model.model, p, got_on[f"r{i}"], PARAMS.max_tokens, ignore_eos=True))
    assert total.exact == len(prompts)
    stats = on.stats()
    # Every request after the first found the 60-token system prompt (15 blocks of 4) cached.
    assert stats["prefix_hit_tokens"] >= 60 * (len(prompts) - 1)
    assert stats["prefix_queried_tokens"] == sum(map(len, prompts))
    assert off.stats()["prefix_hit_tokens"] == 0
    # Nothing is held once every request ended: cached blocks count as free.
    assert stats["free_blocks"] == stats["num_blocks"] and stats["used_blocks"] == 0
    assert stats["cached_blocks"] > 0 and off.stats()["cached_blocks"] == 0


def test_cache_on_is_exact_under_preemption_and_eviction(tiny_model):
    prompts = shared_prefix_prompts(16, seed=7, prefix_len=33)
    kwargs = dict(block_size=4, num_blocks=40, max_running=8, max_batched_tokens=48)
    on, off = LLMEngine(tiny_model, **kwargs), LLMEngine(tiny_model, prefix_caching=False, **kwargs)
    got_on, got_off = run_staggered(on, prompts, gap=1), run_staggered(off, prompts, gap=1)
    stats = on.stats()
    assert stats["preemptions"] > 0 and stats["cache_evictions"] > 0, "the pool was meant to be too small"
    assert got_on == got_off
    total = Comparison()
    for i, p in enumerate(prompts):
        total.add(compare_greedy(tiny_model.model, p, got_on[f"r{i}"], PARAMS.max_tokens, ignore_eos=True))
    assert total.exact + total.near_ties == len(prompts) and total.near_ties <= 1
    assert stats["free_blocks"] == 40 and stats["prefix_hit_tokens"] > 0


def test_imported_kv_is_cached_and_a_partial_hand_off_continues_exactly(tiny_model):
    """A decode engine that already holds a conversation's first turn reserves
    with its cached prefix, imports only the rest, and decodes exactly; the
    imported blocks serve the next request from cache."""
    rng = random.Random(11)
    turn1 = [rng.randrange(0, 256) for _ in range(45)]
    turn2 = turn1 + [rng.randrange(0, 256) for _ in range(20)]
    src = LLMEngine(tiny_model, block_size=8, num_blocks=64)
    dst = LLMEngine(tiny_model, block_size=4, num_blocks=64)
    assert dst.generate([turn1], PARAMS)  # the first turn ran here: its blocks stay cached
    src.add_request("t2", params=PARAMS, prompt_token_ids=turn2, export_after_prefill=True)
    (first,) = src.step()
    assert first.kv_ready
    reservation = dst.reserve("t2", len(turn2) + 1, token_ids=turn2)
    assert reservation is not None and reservation.cached_tokens == 44  # 11 full blocks of 4
    handoff = src.export_kv("t2", start=reservation.cached_tokens)
    assert handoff.num_tokens == len(turn2) - 44
    src.release("t2")
    assert dst.import_kv(handoff, PARAMS, request_id="t2")
    out = first.new_token_ids + run_to_completion(dst)["t2"].token_ids
    assert compare_greedy(tiny_model.model, turn2, out, PARAMS.max_tokens, ignore_eos=True).exact
    # The imported blocks are cached now: the same prompt again hits all of its full blocks.
    hits = dst.stats()["prefix_hit_tokens"]
    again = dst.generate([turn2], PARAMS)[0].token_ids
    assert dst.stats()["prefix_hit_tokens"] - hits == 64 and again == out
    assert dst.stats()["free_blocks"] == 64 and src.stats()["free_blocks"] == 64


def test_the_next_turn_continues_the_last_turns_partly_filled_block_exactly(tiny_model):
    """A finished turn's last, partly filled block is cached too: the next turn (the history, the
    served answer, a new message) computes only what comes after it, and decodes exactly."""
    rng = random.Random(13)
    turn1 = [rng.randrange(0, 256) for _ in range(43)]
    on = LLMEngine(tiny_model, block_size=8, num_blocks=64)
    off = LLMEngine(tiny_model, block_size=8, num_blocks=64, prefix_caching=False)
    answer = on.generate([turn1], PARAMS)[0].token_ids
    assert answer == off.generate([turn1], PARAMS)[0].token_ids
    turn2 = turn1 + answer + [rng.randrange(0, 256) for _ in range(20)]
    hits = on.stats()["prefix_hit_tokens"]
    got = on.generate([turn2], PARAMS)[0].token_ids
    # 43 + 12 - 1 = 54 tokens of turn 1 were computed (the last answer token never is): 6 full blocks
    # of 8 and a tail of 6, all of them found.
    assert on.stats()["prefix_hit_tokens"] - hits == 54
    assert got == off.generate([turn2], PARAMS)[0].token_ids
    assert compare_greedy(tiny_model.model, turn2, got, PARAMS.max_tokens, ignore_eos=True).exact
    assert on.stats()["free_blocks"] == 64
