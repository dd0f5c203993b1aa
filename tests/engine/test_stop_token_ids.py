"""stop_token_ids: bounded in count, and looked up as a set (not scanned per token)."""

from __future__ import annotations

import pytest

from engine.llm_engine import LLMEngine, run_to_completion
from engine.sampling_params import MAX_STOP_TOKEN_IDS, InvalidRequestError, SamplingParams


class ScanCountingTuple(tuple):
    """A tuple that counts membership tests (a per-token scan of the list)."""

    scans = 0

    def __contains__(self, item) -> bool:
        type(self).scans += 1
        return super().__contains__(item)


def test_too_many_stop_token_ids_are_refused_by_name():
    SamplingParams(stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS))).validate()
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS + 1))).validate()
    assert e.value.field == "stop_token_ids" and str(MAX_STOP_TOKEN_IDS) in e.value.reason


def test_stop_token_ids_are_a_set_lookup_and_still_stop(tiny_model):
    engine = LLMEngine(tiny_model, num_blocks=64)
    free = engine.generate(["stop me"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    stop_at = free.token_ids[3]
    ids = ScanCountingTuple([t for t in range(MAX_STOP_TOKEN_IDS - 1) if t not in free.token_ids] + [stop_at])
    engine.add_request("r", "stop me", SamplingParams(max_tokens=6, ignore_eos=True, stop_token_ids=ids))
    ScanCountingTuple.scans = 0
    out = run_to_completion(engine)["r"]
    assert out.token_ids == free.token_ids[:free.token_ids.index(stop_at) + 1] and out.finish_reason == "stop"
    assert ScanCountingTuple.scans == 0  # never scanned as a list, whatever its length
