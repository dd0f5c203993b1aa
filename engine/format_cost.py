"""The cost model of a model as the engine holds it: the weight bytes its format actually reads.

:class:`analysis.cost_model.ModelDims` counts every weight at one element
size. A quantized format reads far fewer bytes (int8: one byte per weight plus
a scale per row; int4: half a byte plus a scale/zero pair per group), and a
tied LM head may be read two ways depending on the rows it multiplies
(:class:`engine.quant.ByRows`). :class:`FormatCost` keeps ModelDims' FLOPs and
KV bytes and replaces the weight bytes with the bytes of the tensors the
forward reads as held (:meth:`engine.quant.Linear.bytes_read`), so the step
accounting's MBU and the benchmark's bandwidth roofline are for the format
used. For a float32 model the counts equal ModelDims' own.
"""

from __future__ import annotations

from analysis.cost_model import ModelDims
from engine.llama_weights import LlamaWeights


class FormatCost:
    """:class:`engine.step_stats.CostModel` of ``weights`` (dims from ``dims``).

    ``dtype_bytes`` arguments are the activation / embedding / KV element
    size (the format's dtype); the projection and LM-head bytes never depend
    on it: they are what the format holds.
    """

    def __init__(self, dims: ModelDims, weights: LlamaWeights) -> None:
        self.dims = dims
        self.weights = weights
        w = weights
        self._layer_bytes = sum(lin.bytes_read(1) for layer in w.layers
                                for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        self._norm_bytes = sum(_nbytes(t) for layer in w.layers for t in (layer.input_norm, layer.post_norm)) + \
            _nbytes(w.final_norm)

    def held_weight_bytes(self, head_rows: int) -> float:
        """Bytes of every projection, norm and the LM head read by a forward whose LM head multiplies
        ``head_rows`` rows (the embedding rows looked up are not in it)."""
        return float(self._layer_bytes + self._norm_bytes + self.weights.lm_head.bytes_read(head_rows))

    # ------------------------------------------------ engine.step_stats.CostModel
    def weight_bytes_read(self, rows_looked_up: int, dtype_bytes: float) -> float:
        """Weights of one forward (LM head at its few-rows path) plus ``rows_looked_up`` embedding rows."""
        return self.held_weight_bytes(0) + rows_looked_up * self.dims.hidden_size * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: float) -> int:
        return self.dims.kv_bytes_per_token(dtype_bytes)

    def attention_flops(self, num_pairs: float) -> float:
        return self.dims.attention_flops(num_pairs)

    def decode_step(self, batch: int, context_len: float, dtype_bytes: float) -> tuple[float, float]:
        """ModelDims' decode step with the weights as held (the LM head multiplies ``batch`` rows)."""
        nbytes, flops = self.dims.decode_step(batch, context_len, dtype_bytes)
        return nbytes - self.dims.weight_bytes_read(0, dtype_bytes) + self.held_weight_bytes(batch), flops

    def prefill(self, prompt_lens: list[int], dtype_bytes: float) -> tuple[float, float]:
        """ModelDims' prefill with the weights as held (the LM head multiplies one row per prompt)."""
        lens = list(prompt_lens)
        nbytes, flops = self.dims.prefill(lens, dtype_bytes)
        return nbytes - self.dims.weight_bytes_read(0, dtype_bytes) + self.held_weight_bytes(len(lens)), flops


def _nbytes(t) -> int:
    return t.numel() * t.element_size()
