"""KV export → bytes → import into a second engine continues exactly."""

from __future__ import annotations

import dataclasses

import pytest

from engine.kv_handoff import KVHandoff, KVLayoutMismatchError
from engine.llm_engine import LLMEngine, run_to_completion
from engine.sampling_params import SamplingParams
from tests.reference import Comparison, compare_greedy


def prefill_and_export(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, KVHandoff]:
    for i, p in enumerate(prompts):
        engine.add_request(f"h{i}", params=params, prompt_token_ids=p, export_after_prefill=True)
    ready = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.kv_ready and not out.finished and len(out.new_token_ids) == 1
            ready[out.request_id] = engine.export_kv(out.request_id)
    return ready


def handoff_roundtrip(model, prompts, params, *, src_block=16, dst_block=16):
    src = LLMEngine(model, block_size=src_block, num_blocks=256)
    dst = LLMEngine(model, block_size=dst_block, num_blocks=256)
    handoffs = prefill_and_export(src, prompts, params)
    used_before = src.stats()["used_blocks"]
    assert used_before > 0 and src.stats()["parked"] == len(prompts)
    outputs = {}
    for rid, h in handoffs.items():
        wire = KVHandoff.from_bytes(h.to_bytes())
        assert wire.num_tokens == len(h.prompt_token_ids)
        assert (wire.data == h.data).all()
        assert dst.import_kv(wire, params)
        src.release(rid)  # the receiver has it: the sender frees its blocks
        outputs[rid] = list(h.output_token_ids)
    assert src.stats()["free_blocks"] == 256
    for rid, c in run_to_completion(dst).items():
        outputs[rid] += c.token_ids
    assert dst.stats()["free_blocks"] == 256
    return [outputs[f"h{i}"] for i in range(len(prompts))]


def test_tiny_handoff_equals_in_place_decoding_across_block_sizes(tiny_model):
    import random

    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(3, 70))] for _ in range(6)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    in_place = [c.token_ids for c in LLMEngine(tiny_model).generate(prompts, params)]
    assert handoff_roundtrip(tiny_model, prompts, params, src_block=16, dst_block=4) == in_place
    sampled = SamplingParams(max_tokens=16, temperature=0.8, seed=5, ignore_eos=True)
    in_place = [c.token_ids for c in LLMEngine(tiny_model).generate(prompts, sampled)]
    assert handoff_roundtrip(tiny_model, prompts, sampled, src_block=8, dst_block=16) == in_place


def test_smollm2_handoff_matches_generate(smollm2):
    engine = LLMEngine(smollm2, num_blocks=8)
    questions = ["What is the tallest mountain on Earth?", "Name a famous painter."]
    prompts = [engine.tokenize(messages=[{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=24)
    got = handoff_roundtrip(smollm2, prompts, params)
    total = Comparison()
    for p, g in zip(prompts, got):
        total.add(compare_greedy(smollm2.model, p, g, 24))
    assert total.exact == 2


def test_layout_mismatch_is_refused_by_field(tiny_model):
    src = LLMEngine(tiny_model)
    h = prefill_and_export(src, [[1, 2, 3]], SamplingParams(max_tokens=4))["h0"]
    dst = LLMEngine(tiny_model)
    bad = dataclasses.replace(h, layout=dataclasses.replace(h.layout, num_kv_heads=8, dtype="bfloat16"))
    with pytest.raises(KVLayoutMismatchError, match=r"num_kv_heads: 8 != 2; dtype: 'bfloat16' != 'float32'"):
        dst.import_kv(bad, SamplingParams(max_tokens=4))
    assert dst.stats()["used_blocks"] == 0


def test_import_without_room_returns_false_and_takes_nothing(tiny_model):
    src = LLMEngine(tiny_model)
    h = prefill_and_export(src, [list(range(40))], SamplingParams(max_tokens=4))["h0"]
    dst = LLMEngine(tiny_model, block_size=4, num_blocks=12)
    # Another prompt than the hand-off's: sharing its cached blocks would make room.
    dst.add_request("filler", params=SamplingParams(max_tokens=2, ignore_eos=True), prompt_token_ids=list(range(40, 80)))
    dst.step()
    assert not dst.import_kv(h, SamplingParams(max_tokens=4))
    assert dst.stats()["used_blocks"] == 10 and dst.stats()["running"] == 1


def test_corrupt_buffers_are_refused(tiny_model):
    src = LLMEngine(tiny_model)
    wire = prefill_and_export(src, [[1, 2, 3]], SamplingParams(max_tokens=4))["h0"].to_bytes()
    with pytest.raises(ValueError, match="magic"):
        KVHandoff.from_bytes(b"XXXX" + wire[4:])
    with pytest.raises(ValueError, match="bytes"):
        KVHandoff.from_bytes(wire[:-3])


def test_import_into_a_reservation(tiny_model):
    src = LLMEngine(tiny_model)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompt = list(range(30))
    h = prefill_and_export(src, [prompt], params)["h0"]
    dst = LLMEngine(tiny_model, block_size=4, num_blocks=10, max_running=2)
    assert dst.reserve("x", len(prompt) + 1)  # 8 blocks
    assert dst.stats()["used_blocks"] == 8 and dst.stats()["reserved"] == 1
    assert not dst.reserve("y", 12)  # 3 more blocks: no room
    assert dst.reserve("z", 4) and not dst.reserve("w", 4)  # max_running = 2 counts reservations
    assert dst.cancel_reservation("z") and not dst.cancel_reservation("z")
    assert dst.import_kv(h, params, request_id="x")
    assert dst.stats()["reserved"] == 0 and dst.stats()["running"] == 1
    out = run_to_completion(dst)["x"].token_ids
    assert h.output_token_ids + out == LLMEngine(tiny_model).generate([prompt], params)[0].token_ids
    assert dst.stats()["free_blocks"] == 10
    assert dst.reserve("q", 5) and dst.abort_request("q") and dst.stats()["free_blocks"] == 10
