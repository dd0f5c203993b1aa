"""The default model: 8 chat prompts in one batch equal generate()."""

from __future__ import annotations

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.reference import Comparison, compare_greedy

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
    "List three primary colors.",
    "What is 12 times 12?",
    "Say hello in Spanish.",
    "Who wrote Hamlet?",
    "Give me one tip for sleeping better.",
]


def test_eight_chat_prompts_in_one_batch_match_generate(smollm2):
    engine = LLMEngine(smollm2, block_size=16, num_blocks=256)
    max_new = 40
    params = SamplingParams(max_tokens=max_new)
    for i, q in enumerate(QUESTIONS):
        engine.add_request(f"q{i}", params=params, messages=[{"role": "user", "content": q}])
    prompts = {f"q{i}": engine.tokenize(messages=[{"role": "user", "content": q}]) for i, q in enumerate(QUESTIONS)}
    first_step = engine.step()
    assert len(first_step) == 8, "all eight prompts must be prefilled in one batch"
    streams = {o.request_id: (o.new_token_ids, o.new_text) for o in first_step}
    texts = {rid: t for rid, (_, t) in streams.items()}
    tokens = {rid: list(ids) for rid, (ids, _) in streams.items()}
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            texts[out.request_id] += out.new_text
            assert "\ufffd" not in out.new_text
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    total = Comparison()
    for rid, prompt in prompts.items():
        total.add(compare_greedy(smollm2.model, prompt, tokens[rid], max_new))
        eos_free = [t for t in tokens[rid] if t not in smollm2.eos_token_ids]
        assert texts[rid] == smollm2.tokenizer.decode(eos_free, skip_special_tokens=True)
    assert total.exact + total.near_ties == 8 and total.near_ties <= 1
    assert "Paris" in texts["q0"]
    assert set(reasons.values()) <= {"stop", "length"}
    assert engine.stats()["free_blocks"] == 256


def test_ignore_eos_runs_to_max_tokens(smollm2):
    engine = LLMEngine(smollm2, num_blocks=64)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.tokenize(messages=msgs)
    natural = engine.generate([ids], SamplingParams(max_tokens=40))[0]
    assert natural.finish_reason == "stop" and len(natural.token_ids) < 40
    assert natural.token_ids[-1] in smollm2.eos_token_ids
    forced = engine.generate([ids], SamplingParams(max_tokens=len(natural.token_ids) + 5, ignore_eos=True))[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == len(natural.token_ids) + 5
    assert forced.token_ids[: len(natural.token_ids)] == natural.token_ids
