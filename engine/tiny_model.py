"""``builtin:tiny-llama``: a few-layer random-weight Llama and a byte-level
tokenizer, both built in code, for fast tests that still run real model code.

The tokenizer maps every UTF-8 byte to its own token, so a non-ASCII
character spans several tokens: exactly the case incremental detokenization
must handle without emitting broken characters.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from analysis.model_catalog import TINY_LLAMA_CONFIG

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML, the same shape SmolLM2 uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens plus three special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llama(
    vocab_size: int, eos_token_id: int, seed: int = 0, max_position_embeddings: int = 2048
) -> LlamaForCausalLM:
    """Two layers, grouped-query attention (4 query heads over 2 KV heads).

    Weights are drawn with a larger spread than training init so that the
    logits are not all near-ties: greedy comparisons against ``generate()``
    would otherwise be decided by float rounding.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        **TINY_LLAMA_CONFIG,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        initializer_range=0.15,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            p.copy_(torch.randn(p.shape, generator=generator) * config.initializer_range)
    return model.eval()
