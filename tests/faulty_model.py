"""A tiny-llama checkpoint on disk whose logit for one token is always NaN.

Loaded by name like any local Hugging Face directory, it makes the engine fail
requests on its own, with nothing patched: greedy decoding (argmax takes NaN
as the largest value) always picks the poisoned token and succeeds, while no
sampled request can be sampled, so each one ends alone with the engine's
``finish_reason == "error"``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.tiny_model import build_tiny_llama, build_tiny_tokenizer

POISONED_CHAR = "z"  # a byte token of its own in the tiny byte-level tokenizer


def write_nan_logit_model(path: Path) -> tuple[str, int]:
    """Write the checkpoint and its tokenizer to ``path``; (its model name, the poisoned token id)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    token_id = tokenizer.convert_tokens_to_ids(POISONED_CHAR)
    with torch.no_grad():
        model.lm_head.weight[token_id] = float("nan")  # untied: the token's embedding stays finite
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), token_id
