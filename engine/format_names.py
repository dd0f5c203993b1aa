"""The names of the engine's weight formats, torch-free: the one list that the engine, the worker
and cluster configs and the benchmarks iterate over (``model.dtype``, ``model.quantization``)."""

from __future__ import annotations

from typing import Literal, get_args

ComputeDtype = Literal["float32", "bfloat16", "float16"]
# none: dense in the compute dtype; int8 / int4: weight-only; w8a8: int8 weights and int8 activations
Quantization = Literal["none", "int8", "int4", "w8a8"]

COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
# formats whose kernels torch.compile cannot trace (engine.compiled_decode refuses them)
UNCOMPILABLE_QUANTIZATIONS: tuple[str, ...] = ("w8a8",)
