"""Log-probabilities of generated tokens: those of transformers' generate() logits,
with the k most likely alternatives, for greedy and sampled requests alike."""

from __future__ import annotations

import pytest
import torch

from engine.llm_engine import LLMEngine
from engine.sampling_params import MAX_LOGPROBS, InvalidRequestError, SamplingParams
from tests.reference import reference_greedy


def _outputs(engine: LLMEngine, rid: str) -> list:
    lps = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                lps += out.logprobs or []
    return lps


def test_greedy_logprobs_match_the_reference_logits(tiny_model):
    engine = LLMEngine(tiny_model, num_blocks=64)
    ids = tiny_model.tokenizer("log probs of", add_special_tokens=False)["input_ids"]
    engine.add_request("a", params=SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3), prompt_token_ids=ids)
    engine.add_request("b", params=SamplingParams(max_tokens=5, ignore_eos=True), prompt_token_ids=ids)  # asks none
    lps = _outputs(engine, "a")
    ref_tokens, ref_logits = reference_greedy(tiny_model.model, ids, 5, ignore_eos=True)
    assert [lp.token_id for lp in lps] == ref_tokens
    for lp, logits in zip(lps, ref_logits):
        want = torch.log_softmax(logits.double(), -1)
        top = torch.topk(want, 3)
        assert lp.logprob == pytest.approx(float(want[lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely


def test_sampled_tokens_report_their_own_logprob_and_zero_alternatives(tiny_model):
    engine = LLMEngine(tiny_model, num_blocks=64)
    engine.add_request("s", "hello", SamplingParams(max_tokens=6, temperature=1.5, seed=7, ignore_eos=True,
                                                    logprobs=0))
    lps = _outputs(engine, "s")
    assert len(lps) == 6 and all(lp.top == () and lp.logprob <= 0.0 for lp in lps)


def test_logprobs_out_of_range_are_refused_by_name():
    SamplingParams(logprobs=MAX_LOGPROBS).validate()
    for bad in (-1, MAX_LOGPROBS + 1):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(logprobs=bad).validate()
        assert e.value.field == "logprobs"
