"""The engine's own copy of a Llama-family model's weights: fused, in one format.

Built once from the loaded Hugging Face module: per layer one QKV projection
(``[q; k; v]`` rows) and one gate/up projection (``[gate; up]`` rows), each a
:class:`~engine.quant.Linear` in the chosen format; the norms' weights; the
token embedding (dense, looked up by row); the LM head; and a rotary cos/sin
table for every position, computed by the model's own rotary module so that
float32 stays bit-identical to ``transformers``.

Dense weights share storage with the HF module (its ``q_proj.weight`` etc.
become views into the fused tensors), so the module still runs
``generate()`` and nothing is held twice. Quantized formats free the HF
module's projection weights instead (the module can no longer run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.format_names import COMPUTE_DTYPES
from engine.kv_cache import KVLayout
from engine.llama_ops import signed_sin
from engine.quant import ByRows, DenseLinear, Int8GroupLinear, Linear, int4_vnni_available, make_linear

DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}
# A tied quantized LM head's GEMV kernel up to this many rows, the embedding's dense GEMM above; w8a8's
# int8 GEMM beats the dense one at every row count (49152 x 576, one thread: 0.6 ms vs 2.9 at 1 row,
# 7.2 vs 10.0 at 64), so its head is never split.
HEAD_QUANTIZED_MAX_ROWS = {"int8": 4}


@dataclass(frozen=True)
class WeightFormat:
    """How the engine holds and computes a model: activation / KV dtype and weight quantization."""

    dtype: str = "float32"        # activations, norms, embedding, KV cache
    quantization: str = "none"    # linear layers' weights: engine.format_names.QUANTIZATIONS

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        return self.dtype if self.quantization == "none" else f"{self.quantization}/{self.dtype}"


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass
class LlamaWeights:
    """Everything the forward reads; see the module docstring."""

    fmt: WeightFormat
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    eps: float
    embed: torch.Tensor        # [vocab, hidden], dtype
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: Linear
    rope_cos: torch.Tensor     # [max_positions, head_dim], dtype
    rope_sin_signed: torch.Tensor  # sin with its first half negated (engine.llama_ops.rotate)

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout(len(self.layers), self.num_kv_heads, self.head_dim, self.fmt.dtype)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def linear_bytes(self) -> int:
        """Bytes of every projection and the LM head as held (what a decode step reads)."""
        per_layer = sum(lin.nbytes for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        return per_layer + self.lm_head.nbytes

    def resident_bytes(self) -> int:
        """Bytes of every tensor the engine keeps (embedding once even when tied to the LM head)."""
        norms = sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.input_norm, layer.post_norm))
        head = 0 if (isinstance(self.lm_head, DenseLinear) and self.lm_head.weight.data_ptr() == self.embed.data_ptr()) \
            else self.lm_head.nbytes
        per_layer = sum(lin.nbytes for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        rope = 2 * self.rope_cos.numel() * self.rope_cos.element_size()
        return per_layer + head + norms + rope + self.embed.numel() * self.embed.element_size() + \
            self.final_norm.numel() * self.final_norm.element_size()


def _bias(*linears) -> torch.Tensor | None:
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
                      for b, lin in zip(biases, linears)])


def _fuse(linears, fmt: WeightFormat) -> Linear:
    """One Linear over the row-concatenation of ``linears``' weights (HF nn.Linear modules)."""
    weight = torch.cat([lin.weight.data for lin in linears])
    bias = _bias(*linears)
    if fmt.quantization == "none":
        weight = weight.to(fmt.torch_dtype).contiguous()
        if weight.dtype == linears[0].weight.dtype:
            # Share storage: the HF module's weights become views of the fused tensor.
            row = 0
            for lin in linears:
                n = lin.weight.shape[0]
                lin.weight.data = weight[row:row + n]
                row += n
        return DenseLinear(weight, None if bias is None else bias.to(fmt.torch_dtype))
    fused = make_linear(weight, bias, fmt.quantization, fmt.torch_dtype)
    for lin in linears:  # the quantized copy replaces them
        lin.weight.data = torch.empty(0, dtype=lin.weight.dtype)
    return fused


def rope_table(model, num_positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[num_positions, head_dim]`` from the model's rotary module (HF's own arithmetic)."""
    decoder = model.model
    probe = torch.zeros(1, dtype=torch.float32, device=decoder.embed_tokens.weight.device)
    positions = torch.arange(num_positions, device=probe.device)[None]
    with torch.inference_mode():
        cos, sin = decoder.rotary_emb(probe, positions)
    return cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()


@torch.inference_mode()
def build_weights(model, fmt: WeightFormat, num_positions: int) -> LlamaWeights:
    """Fuse and convert ``model``'s weights (a Llama-family HF module) into ``fmt``."""
    cfg = model.config
    decoder = model.model
    dtype = fmt.torch_dtype
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cos, sin = rope_table(model, num_positions, dtype)
    layers = []
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight.data.to(dtype),
            qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj], fmt),
            o=_fuse([attn.o_proj], fmt),
            post_norm=layer.post_attention_layernorm.weight.data.to(dtype),
            gate_up=_fuse([mlp.gate_proj, mlp.up_proj], fmt),
            down=_fuse([mlp.down_proj], fmt),
        ))
    embed = decoder.embed_tokens.weight.data.to(dtype)
    tied = model.lm_head.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()
    if fmt.quantization == "none" and tied:
        lm_head: Linear = DenseLinear(embed, None)
    elif fmt.quantization == "none":
        lm_head = DenseLinear(model.lm_head.weight.data.to(dtype), None)
    elif fmt.quantization in ("int8", "int4") and embed.device.type == "cpu" and int4_vnni_available():
        # The head in int8 per group of 32 on the VNNI kernel: a Q4 GGUF stores its tied embedding / head as
        # Q8_0, which this grid holds without loss (int4 lost it: benchmarks.quality's int4/bf16 perplexity
        # +5.4 % with an int4 head, +0.96 % with a dense one), and the kernel beats the dense GEMM at every
        # row count, so the head is never split by rows.
        lm_head = Int8GroupLinear(model.lm_head.weight.data, None, dtype)
        if not tied:
            model.lm_head.weight.data = torch.empty(0, dtype=model.lm_head.weight.dtype)
    elif fmt.quantization == "int4" and tied:
        # No integer-dot kernel (a GPU, a CPU without AVX2): the dense head over the embedding, which is kept anyway. An
        # int4 head fails int4's quality bar (+5.4 % perplexity, above), so it is never used for a tied head.
        lm_head = DenseLinear(embed, None)
    else:
        lm_head = make_linear(model.lm_head.weight.data, None, fmt.quantization, dtype)
        if tied and fmt.quantization in HEAD_QUANTIZED_MAX_ROWS:
            # Past a few rows the quantized head's GEMV kernel loses to a dense GEMM over the embedding
            # matrix, which is kept (in dtype) anyway; measured crossover on AVX512-BF16: ~4 rows for int8
            # (49152 x 576: int8 2.4 ms at 1 row, 6.4 at 8, 49 at 64; bf16 dense 4.3 / 4.9 / 13).
            lm_head = ByRows(lm_head, DenseLinear(embed), HEAD_QUANTIZED_MAX_ROWS[fmt.quantization])
        elif not tied:
            model.lm_head.weight.data = torch.empty(0, dtype=model.lm_head.weight.dtype)
    if embed.data_ptr() != decoder.embed_tokens.weight.data_ptr():
        decoder.embed_tokens.weight.data = embed  # the HF module keeps no second copy in another dtype
        if tied:
            model.lm_head.weight = decoder.embed_tokens.weight
    return LlamaWeights(
        fmt=fmt, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, eps=float(cfg.rms_norm_eps),
        embed=embed, layers=layers, final_norm=decoder.norm.weight.data.to(dtype), lm_head=lm_head,
        rope_cos=cos, rope_sin_signed=signed_sin(sin),
    )
