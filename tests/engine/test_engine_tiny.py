"""The engine on builtin:tiny-llama: exactness under continuous batching,
preemption and chunked prefill; sampling; stop conditions; bad input; aborts."""

from __future__ import annotations

import random

import pytest

from engine.llm_engine import LLMEngine, run_to_completion
from engine.sampling_params import InvalidRequestError, SamplingParams
from tests.reference import Comparison, compare_greedy


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def test_staggered_arrivals_with_preemption_match_generate(tiny_model):
    """32 prompts of mixed lengths join at staggered steps into a pool that is
    far too small for all of them; every greedy output equals generate()."""
    prompts = random_prompts(32, seed=1)
    max_new = 24
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=48, max_running=12, max_batched_tokens=48)
    params = SamplingParams(max_tokens=max_new, ignore_eos=True)
    arrivals = sorted(random.Random(2).randrange(0, 60) for _ in prompts)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step, nxt = 0, 0
    while nxt < len(prompts) or engine.has_unfinished():
        while nxt < len(prompts) and arrivals[nxt] <= step:
            engine.add_request(f"r{nxt}", params=params, prompt_token_ids=prompts[nxt])
            nxt += 1
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        step += 1
        assert engine.stats()["used_blocks"] <= 48
    stats = engine.stats()
    assert stats["preemptions"] > 0, "the pool was meant to force preemption"
    assert stats["free_blocks"] == 48 and stats["running"] == stats["waiting"] == 0
    total = Comparison()
    for i, p in enumerate(prompts):
        assert len(got[f"r{i}"]) == max_new
        total.add(compare_greedy(tiny_model.model, p, got[f"r{i}"], max_new, ignore_eos=True))
    assert total.exact + total.near_ties == 32
    assert total.near_ties <= 2, f"{total.near_ties} near-ties is more than float noise explains"


def test_prompt_longer_than_the_step_budget_is_chunked_and_exact(tiny_model):
    prompt = random_prompts(1, seed=3, lo=300, hi=301)[0]
    engine = LLMEngine(tiny_model, block_size=16, num_blocks=64, max_batched_tokens=64)
    engine.add_request("long", params=SamplingParams(max_tokens=8, ignore_eos=True), prompt_token_ids=prompt)
    steps_to_first_token = 0
    first = []
    while not first:
        first = engine.step()
        steps_to_first_token += 1
    assert steps_to_first_token == 5  # ceil(300 / 64)
    rest = run_to_completion(engine)["long"].token_ids
    assert compare_greedy(tiny_model.model, prompt, first[0].new_token_ids + rest, 8, ignore_eos=True).exact


def test_cache_sized_by_bytes(tiny_model):
    probe = LLMEngine(tiny_model, num_blocks=1)
    per_block = probe.layout.bytes_per_token * 16
    engine = LLMEngine(tiny_model, block_size=16, kv_cache_bytes=10 * per_block + per_block // 2)
    assert engine.stats()["num_blocks"] == 10
    assert engine.cache.layers[0].shape[2] == 10 * 16  # [2, kv_heads, slots, head_dim]
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        LLMEngine(tiny_model, kv_cache_bytes=per_block - 1)
    with pytest.raises(ValueError, match="not both"):
        LLMEngine(tiny_model, num_blocks=4, kv_cache_bytes=per_block)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_model):
    prompt = random_prompts(1, seed=4)[0]
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = LLMEngine(tiny_model, num_blocks=64).generate([prompt], params)[0].token_ids
    # Same request among others, in a pool that forces preemption.
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=40, max_running=8)
    others = random_prompts(8, seed=5)
    for i, p in enumerate(others):
        engine.add_request(f"o{i}", params=SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True),
                           prompt_token_ids=p)
    engine.add_request("me", params=params, prompt_token_ids=prompt)
    crowded = run_to_completion(engine)["me"].token_ids
    assert engine.stats()["preemptions"] > 0
    assert crowded == alone
    other_seed = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=99, ignore_eos=True)
    assert LLMEngine(tiny_model, num_blocks=64).generate([prompt], other_seed)[0].token_ids != alone


def test_degenerate_sampling_settings_equal_greedy(tiny_model):
    prompt = random_prompts(1, seed=6)[0]
    greedy = LLMEngine(tiny_model).generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    for p in (SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True)):
        assert LLMEngine(tiny_model).generate([prompt], p)[0].token_ids == greedy


def test_stop_token_ids_and_max_tokens(tiny_model):
    prompt = random_prompts(1, seed=7)[0]
    base = LLMEngine(tiny_model).generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 30
    stop_tok = base.token_ids[10]
    cut = base.token_ids.index(stop_tok)
    out = LLMEngine(tiny_model).generate([prompt], SamplingParams(max_tokens=30, stop_token_ids=(stop_tok,)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: cut + 1]  # the stop token is the last output token


def test_stop_string_cuts_the_text_before_it(tiny_model):
    prompt = list(b"The quick brown fox ")
    base = LLMEngine(tiny_model).generate([prompt], SamplingParams(max_tokens=60, ignore_eos=True))[0]
    text = base.text
    printable = [i for i in range(5, len(text) - 3) if text[i:i + 3].isprintable() and "\ufffd" not in text[i:i + 3]]
    assert printable, f"no usable stop string in {text!r}"
    i = printable[0]
    stop = text[i:i + 3]
    first = text.find(stop)
    out = LLMEngine(tiny_model).generate([prompt], SamplingParams(max_tokens=60, stop=(stop, "never-present")))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:first]


def test_streamed_text_never_splits_a_multibyte_character(tiny_model):
    """Byte-level tokens: every non-ASCII character spans several tokens."""
    from engine.detokenizer import IncrementalDetokenizer

    tok = tiny_model.tokenizer
    text = "naïve café — 你好, 😊 déjà vu €"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters really are split
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id])
    pieces = [detok.add_token(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    held = [p for p in pieces[:-1] if p == ""]
    assert held, "some tokens must have been held back until their character completed"


def test_stop_string_spanning_several_tokens_is_never_emitted(tiny_model):
    from engine.detokenizer import IncrementalDetokenizer

    tok = tiny_model.tokenizer
    ids = tok("abc STOP def", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, [0], stop=("STOP",))
    pieces = []
    for t in ids:
        pieces.append(detok.add_token(t))
        if detok.stopped_by:
            break
    assert detok.stopped_by == "STOP"
    assert "".join(pieces) == "abc "


BAD_INPUTS = [
    (dict(prompt=""), "prompt"),
    (dict(prompt_token_ids=[]), "prompt"),
    (dict(prompt_token_ids=[1] * 2048), "prompt"),
    (dict(prompt_token_ids=[100000]), "prompt_token_ids"),
    (dict(params=SamplingParams(max_tokens=0)), "max_tokens"),
    (dict(params=SamplingParams(max_tokens=-3)), "max_tokens"),
    (dict(params=SamplingParams(temperature=-0.5)), "temperature"),
    (dict(params=SamplingParams(top_p=0.0)), "top_p"),
    (dict(params=SamplingParams(top_p=1.5)), "top_p"),
    (dict(params=SamplingParams(top_k=-1)), "top_k"),
    (dict(params=SamplingParams(stop=("",))), "stop"),
    (dict(params=SamplingParams(stop=tuple("abcdefghijklmnopq"))), "stop"),
    (dict(params=SamplingParams(max_tokens=100000)), "max_tokens"),
    (dict(messages=[]), "messages"),
]


def test_bad_input_is_refused_by_field_while_others_keep_running(tiny_model):
    good_prompt = random_prompts(1, seed=8)[0]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    expected = LLMEngine(tiny_model).generate([good_prompt], params)[0].token_ids
    engine = LLMEngine(tiny_model, num_blocks=64)
    engine.add_request("good", params=params, prompt_token_ids=good_prompt)
    got = []
    for out in engine.step():
        got += out.new_token_ids
    for i, (kwargs, field) in enumerate(BAD_INPUTS):
        kwargs = dict(kwargs)
        if "prompt" not in kwargs and "prompt_token_ids" not in kwargs and "messages" not in kwargs:
            kwargs["prompt"] = "hello"
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request(f"bad{i}", **kwargs)
        assert e.value.field == field, (kwargs, e.value)
        assert field in str(e.value)
        for out in engine.step():
            got += out.new_token_ids
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.add_request("good", prompt="again")
    got += run_to_completion(engine)["good"].token_ids
    assert got == expected
    assert engine.stats()["free_blocks"] == 64


def test_generation_stops_at_the_context_limit(tiny_model):
    from engine.model_loader import TINY_MODEL, load_model

    small = load_model(TINY_MODEL, max_model_len=40)
    out = LLMEngine(small).generate([[5] * 30], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_abort_frees_blocks_in_every_state(tiny_model):
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=32, max_running=2)
    prompts = random_prompts(4, seed=9, lo=20, hi=40)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", params=SamplingParams(max_tokens=50, ignore_eos=True), prompt_token_ids=p)
    engine.add_request("parked", params=SamplingParams(max_tokens=50), prompt_token_ids=prompts[0],
                       export_after_prefill=True)
    for _ in range(3):
        engine.step()
    assert engine.stats()["used_blocks"] > 0
    for rid in ("r0", "r3", "r1", "r2", "parked"):  # running, waiting, ...
        assert engine.abort_request(rid) in (True,)
    assert not engine.abort_request("r0")
    assert engine.stats()["free_blocks"] == 32
    assert not engine.has_unfinished() and engine.step() == []


def test_subnormal_temperature_is_sampled_safely_beside_greedy_requests(tiny_model):
    # 1e-40 is a float32 subnormal: dividing float32 logits by it overflowed and
    # made torch.multinomial raise, failing the whole batch.
    prompts = random_prompts(5, seed=11)
    greedy = LLMEngine(tiny_model).generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    engine = LLMEngine(tiny_model)
    for i, p in enumerate(prompts[:4]):
        engine.add_request(f"g{i}", params=SamplingParams(max_tokens=8, ignore_eos=True), prompt_token_ids=p)
    engine.add_request("tiny-t", params=SamplingParams(max_tokens=8, temperature=1e-40, seed=3, ignore_eos=True),
                       prompt_token_ids=prompts[4])
    done = run_to_completion(engine)
    assert [done[f"g{i}"].token_ids for i in range(4)] == [g.token_ids for g in greedy[:4]]
    # Such a temperature is greedy in effect.
    assert done["tiny-t"].token_ids == greedy[4].token_ids and done["tiny-t"].finish_reason == "length"


def test_a_request_whose_logits_cannot_be_sampled_fails_alone(tiny_model, monkeypatch):
    prompts = random_prompts(3, seed=12)
    reference = LLMEngine(tiny_model).generate(prompts[:2], SamplingParams(max_tokens=6, ignore_eos=True))
    engine = LLMEngine(tiny_model, num_blocks=64)
    execute = engine.runner.execute

    def poisoned(chunks, kv):  # a fault injected into one row: non-finite logits for "bad"
        sampled, logits = execute(chunks, kv)
        logits = logits.clone()
        for row, chunk in enumerate(sampled):
            if chunk.seq.request_id == "bad":
                logits[row] = float("nan")
        return sampled, logits

    monkeypatch.setattr(engine.runner, "execute", poisoned)
    for i, p in enumerate(prompts[:2]):
        engine.add_request(f"ok{i}", params=SamplingParams(max_tokens=6, ignore_eos=True), prompt_token_ids=p)
    engine.add_request("bad", params=SamplingParams(max_tokens=6, temperature=0.7, seed=1, ignore_eos=True),
                       prompt_token_ids=prompts[2])
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    bad = [o for o in outputs if o.request_id == "bad"]
    assert len(bad) == 1 and bad[0].finish_reason == "error" and "non-finite" in bad[0].error
    for i in range(2):
        ids = [t for o in outputs if o.request_id == f"ok{i}" for t in o.new_token_ids]
        assert ids == reference[i].token_ids
    assert engine.stats()["free_blocks"] == engine.stats()["num_blocks"]
