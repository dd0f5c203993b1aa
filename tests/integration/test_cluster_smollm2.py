"""The product path on the real model: router → prefill → KV over gloo →
decode, 16 concurrent requests, greedy output identical to generate()."""

from __future__ import annotations

import pytest

from benchmarks.deployments import make_config, running
from router.client import Client
from tests.integration.clusters import chat_ids, generate_many
from tests.reference import Comparison, compare_greedy

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain gravity in one sentence.",
    "List three primary colors.", "What is 12 times 12?", "Say hello in Spanish.", "Who wrote Hamlet?",
    "Give me one tip for sleeping better.", "What is photosynthesis?", "Name a famous painter.",
    "How many legs does a spider have?", "What is the boiling point of water?", "Suggest a name for a cat.",
    "What does a CPU do?", "Translate 'thank you' to French.", "Why do leaves change color in autumn?",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def smollm2_cluster(ray_head):
    with running(make_config("builtin:smollm2-135m-instruct", backend="gloo")) as (d, address):
        yield address


def test_sixteen_concurrent_requests_match_generate(smollm2_cluster, smollm2):
    outs = generate_many(smollm2_cluster, [
        dict(messages=[{"role": "user", "content": q}], max_tokens=MAX_NEW) for q in QUESTIONS])
    total = Comparison()
    for q, out in zip(QUESTIONS, outs):
        assert out.finish_reason in ("stop", "length")
        total.add(compare_greedy(smollm2.model, chat_ids(smollm2.tokenizer, q), out.token_ids, MAX_NEW))
        assert out.usage.completion_tokens == len(out.token_ids)
        assert out.timings.transfer_bytes > 0 and out.timings.ttft_ms > 0
    assert total.exact + total.near_ties == 16 and total.near_ties <= 1
    assert "Paris" in outs[0].text

    status = Client(smollm2_cluster).status()
    pools = {p.kind: p for p in status.pools}
    assert [len(pools["prefill"].workers), len(pools["decode"].workers)] == [1, 1]
    assert pools["prefill"].workers[0].requests_served >= 16
    assert pools["decode"].workers[0].requests_served >= 16
    assert pools["decode"].workers[0].tokens_generated >= 16
    for p in status.pools:  # nothing leaked once every request is done
        for w in p.workers:
            assert w.alive and w.used_blocks == 0, w


def test_raw_prompt_and_streaming_text(smollm2_cluster, smollm2):
    client = Client(smollm2_cluster)
    pieces = list(client.stream("The capital of Italy is", max_tokens=8, ignore_eos=True))
    assert pieces[-1].finish_reason and sum(len(p.token_ids) for p in pieces) == 8
    ids = smollm2.tokenizer("The capital of Italy is", add_special_tokens=False)["input_ids"]
    tokens = [t for p in pieces for t in p.token_ids]
    compare_greedy(smollm2.model, ids, tokens, 8, ignore_eos=True)  # asserts equality up to counted near-ties
    assert "".join(p.text for p in pieces) == smollm2.tokenizer.decode(tokens, skip_special_tokens=True)
