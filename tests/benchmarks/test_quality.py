"""The quality benchmark's measures: windowed perplexity scores every token once, agreement counts."""

from __future__ import annotations

import math

import torch

from benchmarks.quality import TEXT, agreement, perplexity
from engine.model_runner import sequence_logits


def test_windowed_perplexity_scores_each_token_once(tiny_model):
    ids = [(7 * i + 3) % 200 for i in range(90)]
    logits = sequence_logits(tiny_model.weights, torch.tensor(ids)).float()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).sum()
    whole = math.exp(float(nll) / (len(ids) - 1))
    assert math.isclose(perplexity(tiny_model, ids, window=128, stride=64), whole, rel_tol=1e-6)
    windowed = perplexity(tiny_model, ids, window=32, stride=16)  # less context per token: a different figure
    assert windowed != whole and 1 < windowed < 1e4


def test_sequence_logits_match_the_hf_module(tiny_model):
    ids = torch.tensor([[5, 9, 2, 77, 31, 8]])
    with torch.inference_mode():
        ref = tiny_model.model(ids).logits[0]
    torch.testing.assert_close(sequence_logits(tiny_model.weights, ids[0]), ref, atol=1e-5, rtol=1e-5)


def test_agreement():
    ref = [[1, 2, 3, 4], [1, 2, 3, 4]]
    got = [[1, 2, 3, 4], [1, 9, 3, 4]]
    assert agreement(ref, got) == {"identical_share": 0.5, "mean_first_divergence": 2.5}


def test_the_text_is_kept_in_the_repo():
    text = TEXT.read_text(encoding="utf-8")
    assert text.startswith("First Citizen:") and len(text) > 30_000
