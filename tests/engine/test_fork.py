"""``n`` samples of one prompt on builtin:tiny-llama: the prompt is prefilled once
and its blocks shared copy-on-write; sample i equals a lone request with seed + i
(greedy: all equal the single greedy output); one sample's end frees only its own
references; nothing leaks. The block manager's fork/copy-on-write on its own too."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from engine.kv_cache_manager import KVCacheManager
from engine.kv_handoff import SampleStart
from engine.llm_engine import LLMEngine, run_to_completion
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.sequence import sample_request_id

BS = 4


def prompt(length: int, seed: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 256) for _ in range(length)]


def lone(engine: LLMEngine, ids: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("lone", params=params, prompt_token_ids=ids)
    return run_to_completion(engine)["lone"].token_ids


def lones(tiny_model, ids: list[int], params: SamplingParams, seeds: list[int]) -> list[list[int]]:
    """Lone requests (no fork), one per seed, batched in a fresh engine."""
    engine = LLMEngine(tiny_model, block_size=BS, num_blocks=128)
    for s in seeds:
        engine.add_request(f"lone{s}", params=replace(params, seed=s), prompt_token_ids=ids)
    done = run_to_completion(engine)
    return [done[f"lone{s}"].token_ids for s in seeds]


def group(engine: LLMEngine, ids: list[int], params: SamplingParams, n: int, rid: str = "g") -> list[list[int]]:
    engine.add_request(rid, params=params, prompt_token_ids=ids, n=n)
    done = run_to_completion(engine)
    return [done[sample_request_id(rid, i)].token_ids for i in range(n)]


# ------------------------------------------------------------------ manager
def test_manager_fork_shares_full_blocks_and_copies_the_partial_one_on_write():
    kv = KVCacheManager(16, BS)
    assert kv.allocate_slots("p", 10)  # 3 blocks: two full, one holding 2 tokens
    for c in ("c1", "c2"):
        kv.fork("p", c, 10)
    assert kv.pool.num_used == 3  # shared, not copied
    full, partial = kv.block_table("p")[:2], kv.block_table("p")[2]
    # Each sharer grows by one token: the first two copy the shared partial block, the last writes in place.
    assert kv.allocate_slots("c1", 11) and kv.allocate_slots("p", 11) and kv.allocate_slots("c2", 11)
    copies = kv.take_copies()
    assert len(copies) == 2 and all(src == partial for src, _ in copies)
    tails = {kv.block_table(s)[2] for s in ("p", "c1", "c2")}
    assert len(tails) == 3 and partial in tails
    assert all(kv.block_table(s)[:2] == full for s in ("p", "c1", "c2"))
    assert kv.pool.num_used == 2 + 3  # the prompt's full blocks once, plus one tail per sample
    for s in ("c1", "p", "c2"):
        kv.free(s)
    assert kv.pool.num_free == 16 and kv.take_copies() == []


def test_manager_spares_pay_for_the_copies_and_come_back():
    kv = KVCacheManager(8, BS)
    assert kv.allocate_slots("p", 6) and kv.hold_spares("p", 2)
    assert kv.pool.num_used == 4
    kv.fork("p", "c1", 5)
    kv.fork("p", "c2", 5)
    kv.allocate_slots("c1", 6)
    kv.allocate_slots("c2", 6)
    assert kv.pool.num_used == 4  # the copies took the spares, not the pool
    kv.free("c1")
    kv.free("c2")
    kv.free("p")
    assert kv.pool.num_free == 8


def test_manager_copy_on_write_waits_for_room():
    kv = KVCacheManager(3, BS)
    assert kv.allocate_slots("p", 6)  # 2 blocks
    kv.fork("p", "c", 6)
    assert kv.allocate_slots("p", 7)  # copies into the last free block
    assert not kv.allocate_slots("c", 9)  # needs a new block; none left
    kv.free("p")  # the shared block is now c's alone; p's copy, never done, is dropped with p's blocks
    assert kv.allocate_slots("c", 7) and kv.take_copies() == []
    kv.free("c")
    assert kv.pool.num_free == 3


# ------------------------------------------------------------------- engine
@pytest.mark.parametrize("length", [10, 12])  # a partly filled last block, and an exact fit
def test_seeded_samples_equal_lone_requests_and_the_prompt_is_prefilled_once(tiny_model, length):
    ids = prompt(length)
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=77, ignore_eos=True)
    engine = LLMEngine(tiny_model, block_size=BS, num_blocks=64, prefix_caching=False)
    got = group(engine, ids, params, 3)
    assert engine.num_forks == 2
    assert engine.stats()["free_blocks"] == 64
    want = lones(tiny_model, ids, params, [77, 78, 79])
    assert got == want
    assert len({tuple(g) for g in got}) > 1, "different seeds should sample differently"


def test_greedy_samples_all_equal_the_single_greedy_output(tiny_model):
    ids = prompt(13, seed=9)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine = LLMEngine(tiny_model, block_size=BS, num_blocks=64)
    single = lone(engine, ids, params)
    got = group(LLMEngine(tiny_model, block_size=BS, num_blocks=64), ids, params, 4)
    assert got == [single] * 4


def test_blocks_are_shared_while_the_samples_run(tiny_model):
    ids = prompt(30, seed=4)  # 8 blocks, the last one partly filled
    engine = LLMEngine(tiny_model, block_size=BS, num_blocks=64, prefix_caching=False)
    engine.add_request("g", params=SamplingParams(max_tokens=3, temperature=1.0, seed=1, ignore_eos=True),
                       prompt_token_ids=ids, n=4)
    peak = 0
    while engine.has_unfinished():
        engine.step()
        peak = max(peak, engine.stats()["used_blocks"])
    # 7 full prompt blocks once, plus each sample's own tail (its copy of the 8th, then one more).
    assert peak <= 7 + 4 * 2 < 4 * 8
    assert engine.stats()["free_blocks"] == 64


def test_cancelling_one_sample_frees_only_its_references(tiny_model):
    ids = prompt(18, seed=5)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=5, ignore_eos=True)
    engine = LLMEngine(tiny_model, block_size=BS, num_blocks=64)
    engine.add_request("g", params=params, prompt_token_ids=ids, n=3)
    got = {sample_request_id("g", i): [] for i in range(3)}
    for out in engine.step():  # the prefill: every sample's first token
        got[out.request_id] += out.new_token_ids
    assert all(len(v) == 1 for v in got.values())
    assert engine.abort_request("g/1")
    del got["g/1"]
    for out in run_to_completion(engine).values():
        got[out.request_id] += out.token_ids
    want = lones(tiny_model, ids, params, [5, 7])
    assert [got["g"], got["g/2"]] == want
    assert engine.stats()["free_blocks"] == 64


def test_aborting_a_sample_before_the_fork_and_the_request_before_its_prefill(tiny_model):
    ids = prompt(9)
    engine = LLMEngine(tiny_model, block_size=BS, num_blocks=64)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("g", params=params, prompt_token_ids=ids, n=3)
    assert engine.abort_request("g/2")  # never forked
    done = run_to_completion(engine)
    assert sorted(done) == ["g", "g/1"]
    engine.add_request("h", params=params, prompt_token_ids=ids, n=3)
    assert engine.abort_request("h")  # the prompt's owner: the group goes
    assert not engine.has_unfinished() and engine.stats()["free_blocks"] == 64
    engine.add_request("h", params=params, prompt_token_ids=ids, n=3)  # every id is free again
    assert len(run_to_completion(engine)) == 3


def test_samples_under_preemption_stay_exact_and_leak_nothing(tiny_model):
    ids = prompt(21, seed=8)
    params = SamplingParams(max_tokens=14, temperature=1.0, seed=3, ignore_eos=True)
    engine = LLMEngine(tiny_model, block_size=BS, num_blocks=16, max_batched_tokens=32)
    got = group(engine, ids, params, 4)
    assert engine.stats()["preemptions"] > 0, "the pool was meant to force preemption"
    assert engine.stats()["free_blocks"] == 16
    want = lones(tiny_model, ids, params, [3, 4, 5, 6])
    assert got == want


def test_n_is_validated(tiny_model):
    engine = LLMEngine(tiny_model, block_size=BS, num_blocks=16)
    for bad in (0, -1, 1.5):
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request("x", params=SamplingParams(), prompt_token_ids=[1, 2], n=bad)
        assert e.value.field == "n"
    with pytest.raises(InvalidRequestError):
        engine.add_request("x", params=SamplingParams(), prompt_token_ids=[1, 2], n=2, output_token_ids=[3])
    assert engine.stats()["free_blocks"] == 16 and not engine.has_unfinished()


def test_prefilled_once_exported_once_imported_once_into_n_samples(tiny_model):
    """The disaggregated path at engine level: the prefill engine draws the n first tokens
    and parks the samples over one copy of the prompt's KV; one export; the decode
    engine reserves the blocks once plus n - 1 spares, imports once and forks."""
    ids = prompt(14, seed=12)
    params = SamplingParams(max_tokens=9, temperature=1.0, seed=21, ignore_eos=True)
    pre = LLMEngine(tiny_model, block_size=BS, num_blocks=32)
    pre.add_request("t", params=params, prompt_token_ids=ids, n=3, export_after_prefill=True)
    firsts = {out.request_id: out for out in pre.step()}
    assert all(o.kv_ready for o in firsts.values()) and len(firsts) == 3
    assert pre.stats()["used_blocks"] == 4  # one copy of the prompt for all three
    handoff = pre.export_kv("t")
    for i in range(3):
        pre.release(sample_request_id("t", i))
    assert pre.stats()["free_blocks"] == 32
    samples = tuple(SampleStart(i, firsts[sample_request_id("t", i)].new_token_ids[0], 21 + i,
                                firsts[sample_request_id("t", i)].new_text) for i in (1, 2))  # sample 0 "finished"
    dec = LLMEngine(tiny_model, block_size=BS, num_blocks=32)
    res = dec.reserve("t", len(ids) + 1, ids, n=3)
    assert res is not None and dec.stats()["used_blocks"] == 4 + 2
    assert dec.import_kv(handoff, params, "t", samples=samples)
    done = run_to_completion(dec)
    assert dec.stats()["free_blocks"] == 32
    want = lones(tiny_model, ids, params, [22, 23])
    assert [[samples[k].token_id] + done[sample_request_id("t", i)].token_ids for k, i in enumerate((1, 2))] == want
