"""Resuming a request from its prompt plus outputs produced elsewhere (the
path a dead worker's requests take): the continuation equals the
uninterrupted run, tokens and text, with nothing streamed twice."""

from __future__ import annotations

import pytest

from engine.llm_engine import LLMEngine, run_to_completion
from engine.sampling_params import InvalidRequestError, SamplingParams


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_resume_continues_exactly(smollm2, cut):
    engine = LLMEngine(smollm2, block_size=16, num_blocks=128)
    prompt = engine.tokenize(messages=[{"role": "user", "content": "Name three colours of the rainbow."}])
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    whole = engine.generate([prompt], params)[0]
    # Text the client had when the first worker died: the text streamed for the first `cut` tokens.
    engine.add_request("a", params=params, prompt_token_ids=prompt)
    streamed_text, n = "", 0
    while n < cut:
        for out in engine.step():
            streamed_text += out.new_text
            n += len(out.new_token_ids)
    engine.abort_request("a")
    engine.add_request("b", params=params, prompt_token_ids=prompt, output_token_ids=whole.token_ids[:cut],
                       emitted_text=streamed_text)
    rest = run_to_completion(engine)["b"]
    assert whole.token_ids[:cut] + rest.token_ids == whole.token_ids
    assert streamed_text + rest.text == whole.text
    assert engine.stats()["free_blocks"] == 128


def test_resume_refuses_outputs_that_already_reach_max_tokens(tiny_model):
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=32)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("x", params=SamplingParams(max_tokens=2), prompt_token_ids=[1, 2, 3],
                           output_token_ids=[4, 5])
    assert e.value.field == "output_token_ids"
