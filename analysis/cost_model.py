"""Analytical cost of a Llama-family decoder, from its dimensions alone.

Pure arithmetic, no torch: ``python -m analysis.bottleneck`` uses it without
loading a model, the engine counts its steps' bytes and FLOPs with it, and the
engine benchmark puts measured step times against its roofline.

The model counted is the Llama / Qwen2 / Mistral decoder: a token embedding,
``num_layers`` blocks of (RMSNorm, attention with ``num_heads`` query heads
and ``num_kv_heads`` key/value heads of ``head_dim``, RMSNorm, SwiGLU MLP
with gate/up/down projections), a final RMSNorm and an ``lm_head`` that may
share the embedding matrix (``tie_word_embeddings``).

Conventions, kept the same everywhere in this module:

* One multiply-add is 2 FLOPs, so a ``[m, k] @ [k, n]`` matmul is ``2 m k n``.
* Attention of one query over ``c`` keys costs ``4 * num_heads * head_dim * c``
  FLOPs per layer: ``2 h d c`` for the scores ``q K^T`` and ``2 h d c`` for
  ``softmax(.) V``. Softmax, norms, RoPE and activations are ignored (they are
  a few percent of the matmuls).
* Bytes are the bytes a step must move between memory and the compute units
  at least once: each weight matrix once per step (however many tokens share
  it), only the embedding *rows* looked up, and the KV cache read (decode) or
  written (prefill). Activations are ignored: they stay in cache or registers
  in a well-fused kernel, and at serving sizes they are small beside the
  weights and the KV.
* ``dtype_bytes`` may be fractional (0.5 for int4 weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

# Bytes per element by dtype name; several spellings so a YAML ``float32`` and a CLI ``fp32`` both work.
DTYPE_BYTES: dict[str, float] = {
    "float32": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2,
    "float16": 2, "fp16": 2,
    "fp8": 1, "int8": 1,
    "int4": 0.5,
}


def dtype_bytes(name: str) -> float:
    """Bytes per element of the dtype called ``name`` (``fp32``, ``bfloat16``, ``int4``, ...)."""
    try:
        return DTYPE_BYTES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class ModelDims:
    """The dimensions that fix a Llama-family decoder's size and cost.

    Biases are off by default (Llama, Mistral); Qwen2 has biases on the
    q/k/v projections, which ``from_hf_config`` sets from ``model_type``.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False    # bias vectors on q, k and v (Qwen2; Llama with attention_bias)
    o_bias: bool = False      # bias vector on o_proj (Llama with attention_bias)
    mlp_bias: bool = False    # bias vectors on gate, up and down (Llama with mlp_bias)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelDims":
        """Dims of any object with Hugging Face Llama / Qwen2 / Mistral config attributes.

        ``head_dim`` may be missing or None (older configs): it is then
        ``hidden_size // num_attention_heads``; ``num_key_value_heads``
        missing means multi-head attention.
        """
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        # Qwen2's config has no attention_bias field: its q/k/v always carry a bias, its o_proj never.
        qwen2 = getattr(config, "model_type", None) == "qwen2"
        return cls(
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab_size=int(config.vocab_size),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )

    # ------------------------------------------------------------ parameters
    @property
    def q_dim(self) -> int:
        """Width of the concatenated query heads (``num_heads * head_dim``)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the concatenated key (or value) heads (``num_kv_heads * head_dim``)."""
        return self.num_kv_heads * self.head_dim

    def layer_matmul_params(self) -> int:
        """Weight-matrix entries of one decoder layer: q, k, v, o and gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        mlp = 3 * h * i
        return attn + mlp

    def layer_params(self) -> int:
        """All parameters of one decoder layer: matrices, biases and the two RMSNorm weights."""
        biases = 0
        if self.qkv_bias:
            biases += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            biases += self.hidden_size
        if self.mlp_bias:
            biases += 2 * self.intermediate_size + self.hidden_size
        return self.layer_matmul_params() + biases + 2 * self.hidden_size

    def embedding_params(self) -> int:
        """The input embedding table (``vocab_size * hidden_size``)."""
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """The output projection's matrix, counted whether or not it is tied to the embedding."""
        return self.vocab_size * self.hidden_size

    def non_embedding_params(self) -> int:
        """Every parameter but the embedding table and an untied ``lm_head``: layers plus the final norm."""
        return self.num_layers * self.layer_params() + self.hidden_size

    def matmul_params(self) -> int:
        """Matrix entries one token multiplies through: all layers' projections plus ``lm_head``."""
        return self.num_layers * self.layer_matmul_params() + self.lm_head_params()

    def param_count(self) -> int:
        """Unique parameters: embedding + layers + final norm + ``lm_head`` unless tied (then counted once)."""
        head = 0 if self.tie_word_embeddings else self.lm_head_params()
        return self.embedding_params() + self.non_embedding_params() + head

    def param_bytes(self, dtype_bytes: float) -> int:
        """Bytes of all weights stored at ``dtype_bytes`` each (rounded up for int4)."""
        return math.ceil(self.param_count() * dtype_bytes)

    # ---------------------------------------------------------------- KV cache
    def kv_bytes_per_token(self, dtype_bytes: float) -> int:
        """KV cache bytes one token occupies: a key and a value vector per KV head, in every layer."""
        return math.ceil(2 * self.num_layers * self.kv_dim * dtype_bytes)

    def kv_cache_bytes(self, batch: int, context_len: int, dtype_bytes: float) -> int:
        """KV cache of ``batch`` sequences of ``context_len`` tokens each."""
        return batch * context_len * self.kv_bytes_per_token(dtype_bytes)

    # ------------------------------------------------------------ step costs
    def weight_bytes_read(self, rows_looked_up: int, dtype_bytes: float) -> float:
        """Weights one forward reads: every matrix once, plus the embedding rows it looks up.

        With tied embeddings the shared matrix is read in full once as the
        ``lm_head`` and its looked-up rows count again (they are fetched by a
        separate gather, usually before the matrix is in cache).
        """
        n = self.non_embedding_params() + self.lm_head_params() + rows_looked_up * self.hidden_size
        return n * dtype_bytes

    def attention_flops(self, num_pairs: float) -> float:
        """FLOPs of ``num_pairs`` (query, key) pairs across all layers and heads (4 per pair per head dim)."""
        return 4 * num_pairs * self.num_layers * self.num_heads * self.head_dim

    def flops_per_token(self, context_len: float) -> float:
        """FLOPs to run one token through the model (with its logits) attending to ``context_len`` keys."""
        return 2 * self.matmul_params() + self.attention_flops(context_len)

    def decode_step(self, batch: int, context_len: float, dtype_bytes: float,
                    kv_dtype_bytes: float | None = None) -> tuple[float, float]:
        """(bytes moved, FLOPs) of one decode step of ``batch`` sequences at mean ``context_len``.

        ``context_len`` is the number of keys each new token attends to (the
        tokens before it plus itself). Bytes: weights once (plus the
        ``batch`` embedding rows) + the whole KV cache read. FLOPs:
        ``2 * matmul_params`` per token (logits included) + attention
        ``4 * layers * heads * head_dim * context_len`` per token.
        ``kv_dtype_bytes`` is the KV cache's element size when it differs
        from the weights' (int4 weights with a bf16 cache); default the same.
        """
        kv_token = self.kv_bytes_per_token(dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes)
        nbytes = self.weight_bytes_read(batch, dtype_bytes) + batch * context_len * kv_token
        flops = batch * self.flops_per_token(context_len)
        return nbytes, flops

    def prefill(self, prompt_lens: Iterable[int], dtype_bytes: float,
                kv_dtype_bytes: float | None = None) -> tuple[float, float]:
        """(bytes moved, FLOPs) of one packed prefill forward of ``prompt_lens``, causal attention.

        Logits are computed for each prompt's last row only (what the engine
        and ``generate()`` do). Token ``i`` (1-based) of a prompt attends to
        ``i`` keys, so a prompt of ``n`` tokens has ``n (n + 1) / 2`` pairs.
        Bytes: weights once (plus one embedding row per token) + the prompt's
        KV written once (at ``kv_dtype_bytes`` each, default ``dtype_bytes``).
        """
        lens = list(prompt_lens)
        tokens = sum(lens)
        kv_token = self.kv_bytes_per_token(dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes)
        nbytes = self.weight_bytes_read(tokens, dtype_bytes) + tokens * kv_token
        pairs = sum(n * (n + 1) / 2 for n in lens)
        flops = (2 * self.num_layers * self.layer_matmul_params() * tokens
                 + 2 * self.lm_head_params() * len(lens)
                 + self.attention_flops(pairs))
        return nbytes, flops

    def as_dict(self) -> dict[str, Any]:
        """The dims and the derived counts, for JSON reports."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "param_count": self.param_count(),
            "non_embedding_params": self.non_embedding_params(),
            "matmul_params": self.matmul_params(),
        }


def arithmetic_intensity(nbytes: float, flops: float) -> float:
    """FLOPs per byte moved: above the machine's ridge point the work is compute-bound."""
    return flops / nbytes if nbytes else math.inf


def roofline_seconds(nbytes: float, flops: float, bandwidth_bytes_per_s: float,
                     flops_per_s: float) -> tuple[float, str]:
    """Lower bound on the time of (bytes, FLOPs) on a machine, and which bound sets it.

    Returns ``(max(bytes / bandwidth, flops / flop_rate), "bandwidth" | "compute")``;
    a tie counts as bandwidth-bound.
    """
    bw_s = nbytes / bandwidth_bytes_per_s
    compute_s = flops / flops_per_s
    return (bw_s, "bandwidth") if bw_s >= compute_s else (compute_s, "compute")
