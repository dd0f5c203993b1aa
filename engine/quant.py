"""Weight formats of the engine's linear layers: dense (float32 / bfloat16),
weight-only int8 (per output channel) or int4 (per group of input channels),
and w8a8 (int8 weights and int8 activations, :class:`W8A8Linear`).

Each format is a :class:`Linear` that holds its weight once, in its own
layout, and computes ``x @ W.T (+ bias)`` in the activations' dtype. On the
CPU int8 uses PyTorch's own packed kernel (``torch._weight_int8pack_mm``) and
int4 the project's integer-dot kernel (``engine/csrc/int4_linear.cpp``: AVX512-VNNI
or AVX2; 3-4.5x torch's ``_weight_int4pack_mm_for_cpu`` on AVX512-VNNI, 2.6-6x on
AVX2, which stays the kernel of CPUs with neither); torch's kernels are fast with bfloat16
activations only (float32 activations take a slow path, 10-50x), so a
quantized linear fed float32 computes in bfloat16 and returns float32. On any other device the quantized formats de-quantize
on the fly with plain tensor ops (correct, not fast): nothing CPU-only runs
on a GPU path.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.format_names import QUANTIZATIONS

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the first that divides the input width is used
# The packed int8 kernel is a GEMV at heart (its time grows with the rows): from about 16 rows on,
# converting the weight to bfloat16 and running one dense GEMM is faster (measured on AVX512-BF16,
# 3072 x 576 weight: 32 rows 0.71 vs 0.87 ms, 64 rows 0.83 vs 1.98 ms, 512 rows 5.5 vs 13.1 ms).
INT8_PACKED_MAX_ROWS = 16
INT4_N_MULTIPLE = 16  # the CPU int4 packing wants output rows in multiples of 16 (padded with zero rows)


class Linear:
    """``y = x @ W.T + b`` for ``x`` of shape ``[..., in_features]``."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of weight (and scales, bias) this layer holds and reads per call."""
        raise NotImplementedError

    def bytes_read(self, rows: int) -> int:
        """Bytes of weight (and scales, bias) a call on ``rows`` rows reads (the held bytes, unless a
        layer holds two copies and picks one by rows)."""
        return self.nbytes

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class DenseLinear(Linear):
    """A plain weight in the compute dtype (``F.linear``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight, self.bias)


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per output channel: ``(q, scale)`` with
    ``weight ≈ q * scale[:, None]`` (``q`` int8, ``scale`` float32)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scale


class Int8Linear(Linear):
    """Symmetric int8 weights with one scale per output channel: ``W ≈ q * scale[:, None]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        self.qweight, scale = int8_per_channel(weight)
        self.kernel_dtype = torch.bfloat16 if weight.device.type == "cpu" else compute_dtype
        self.scale = scale.to(self.kernel_dtype)
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == self.kernel_dtype and x.device.type == "cpu" and x.shape[0] < INT8_PACKED_MAX_ROWS:
            # A decode pack (2-D, the kernel's dtype): one kernel call (see Int4Linear.__call__).
            return self._add_bias(torch._weight_int8pack_mm(x, self.qweight, self.scale))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.device.type == "cpu" and x2.shape[0] < INT8_PACKED_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2.to(self.kernel_dtype), self.qweight, self.scale)
        else:  # many rows (prefill), or no packed kernel off the CPU: one dense GEMM on the converted
            # weight, the per-channel scale applied to the output columns (one pass over the weight)
            y = F.linear(x2.to(self.kernel_dtype), self.qweight.to(self.kernel_dtype)) * self.scale
        return self._add_bias(y.to(x.dtype).view(*shape[:-1], self.out_features))

    @property
    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scale, self.bias)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]


INT4_KERNELS = ("vnni", "torch", "dequantize")


@functools.cache
def int4_vnni_available() -> bool:
    """Whether the project's integer-dot int4 kernel (``engine/csrc/int4_linear.cpp``: AVX512-VNNI, or AVX2) is
    built and usable. Named for the first; the ``vnni`` kernel and layout below mean either."""
    from engine.cpu_kernels import load_cpu_kernels

    if load_cpu_kernels() is not None or not torch.ops.splitserve_cpu.int4_vnni_available():
        return False
    # The output's shape for tracers (torch.compile of the decode step calls the kernel as an opaque op).
    torch.library.register_fake("splitserve_cpu::int4_linear")(
        lambda x, packed, scales, n_out: x.new_empty((x.shape[0], n_out)))
    torch.library.register_fake("splitserve_cpu::int8_group_linear")(
        lambda x, packed, scales, offsets, n_out: x.new_empty((x.shape[0], n_out)))
    return True


def int4_kernel_for(device: torch.device, group_size: int) -> str:
    """The int4 kernel a layer on ``device`` gets: ``vnni`` (the project's integer-dot kernel: CPU,
    AVX512-VNNI or AVX2, groups of 32), else ``torch`` (``_weight_int4pack_mm_for_cpu``) on any other CPU, else
    ``dequantize`` (plain tensor ops: the GPU path, correct, not fast)."""
    if device.type != "cpu":
        return "dequantize"
    return "vnni" if group_size == 32 and int4_vnni_available() else "torch"


def pack_int4_blocks(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``vnni`` kernel's layout of ``W = q * scale + minimum`` (``q`` [n, k] in [0, 15], ``n`` a multiple
    of 16; ``scale``, ``minimum`` [n, k / 32]): ``packed`` uint8 [n / 16, k / 8, 64] where byte ``4r + i``
    of chunk ``c`` holds ``q[r][8c + i]`` (low nibble) and ``q[r][8c + 4 + i]`` (high nibble) of the
    block's 16 rows, and ``scales`` bfloat16 [n / 16, k / 32, 2, 16] (the rows' scales, then minimums)."""
    n, k = q.shape
    blocks = n // 16
    q5 = q.to(torch.uint8).view(blocks, 16, k // 8, 2, 4)
    packed = (q5[:, :, :, 0, :] | (q5[:, :, :, 1, :] << 4)).permute(0, 2, 1, 3).reshape(blocks, k // 8, 64)
    per_block = [t.to(torch.bfloat16).view(blocks, 16, k // 32).permute(0, 2, 1) for t in (scale, minimum)]
    return packed, torch.stack(per_block, dim=2).contiguous()


def unpack_int4_blocks(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight [n, k] that :func:`pack_int4_blocks`' layout holds."""
    blocks, chunks, _ = packed.shape
    n, k = blocks * 16, chunks * 8
    nibbles = packed.view(blocks, chunks, 16, 4)
    q = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=3)  # [blocks, chunks, 16, 2, 4]
    q = q.permute(0, 2, 1, 3, 4).reshape(n, k // 32, 32).float()
    scale, minimum = (scales[:, :, i, :].permute(0, 2, 1).reshape(n, k // 32, 1).float() for i in (0, 1))
    return (q * scale + minimum).view(n, k)


class Int4Linear(Linear):
    """Asymmetric 4-bit weights, one (scale, minimum) pair per ``group_size`` input channels:
    ``W ≈ q * scale + minimum`` with ``q`` in [0, 15], held in the layout of the kernel that computes it
    (:func:`int4_kernel_for`; ``kernel`` forces one):

    - ``vnni``: the project's kernel (:func:`pack_int4_blocks`); activations are quantized to int8 per group
      of 32 inside it and the products summed as integers (3-4.5x torch's kernel on AVX512-VNNI, one
      thread, 1 to 128 rows; ``benchmarks.quality`` measures the format with it).
    - ``torch``: ``_weight_int4pack_mm_for_cpu`` (bfloat16 activations, float products).
    - ``dequantize``: the weight re-expanded per call (devices without a packed kernel).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 group_size: int, kernel: str | None = None) -> None:
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"int4: in_features {k} is not a multiple of the group size {group_size}")
        self.kernel = kernel or int4_kernel_for(weight.device, group_size)
        if self.kernel not in INT4_KERNELS or (self.kernel == "vnni" and group_size != 32):
            raise ValueError(f"int4: kernel must be one of {INT4_KERNELS} (vnni: groups of 32), got {self.kernel!r}")
        if self.kernel == "vnni" and not int4_vnni_available():
            raise ValueError("int4: the vnni kernel is not built for this CPU (see engine.cpu_kernels)")
        self.out_features, self.in_features, self.group_size = n, k, group_size
        padded_n = -(-n // INT4_N_MULTIPLE) * INT4_N_MULTIPLE
        w = torch.zeros(padded_n, k, dtype=torch.float32, device=weight.device)
        w[:n] = weight.float()
        groups = w.view(padded_n, k // group_size, group_size)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(padded_n, k)
        self.kernel_dtype = torch.bfloat16 if weight.device.type == "cpu" else compute_dtype
        self.packed = self.scales = self.scale_zero = self.q = None
        if self.kernel == "vnni":
            self.packed, self.scales = pack_int4_blocks(q, scale, lo)
        else:
            # [k / group, n, 2] with W = (q - 8) * scale + zero: torch's int4 kernel's convention.
            zero = lo + 8.0 * scale
            self.scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(self.kernel_dtype)
            if self.kernel == "torch":
                self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            else:
                self.q = q.to(torch.uint8)  # one value per byte
        self.bias = None if bias is None else bias.to(compute_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and (self.kernel == "vnni" or x.dtype == self.kernel_dtype):
            # The runner's packs are 2-D and in a dtype the kernel takes: one kernel call, none of the reshapes
            # and no-op casts below (at batch 1 those Python-level calls cost as much as a small GEMV).
            y = self._matmul(x.contiguous())
            return self._add_bias(y if y.shape[1] == self.out_features else y[:, :self.out_features])
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._matmul(x2.contiguous() if self.kernel == "vnni" else x2.to(self.kernel_dtype))[:, : self.out_features]
        return self._add_bias(y.to(x.dtype).reshape(*shape[:-1], self.out_features))

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel == "vnni":
            return torch.ops.splitserve_cpu.int4_linear(x2, self.packed, self.scales, self.out_features)
        if self.kernel == "torch":
            return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        return F.linear(x2, self.dequantized(padded=True).to(self.kernel_dtype))

    def dequantized(self, padded: bool = False) -> torch.Tensor:
        """The weight this layer computes with, in float32 ([out, in]; ``padded``: with the zero rows that
        round the output rows up to a multiple of 16)."""
        if self.kernel == "vnni":
            w = unpack_int4_blocks(self.packed, self.scales)
        else:
            if self.kernel == "torch":
                # torch keeps no unpacking operator for its CPU layout: the identity through its own kernel
                # (so rounded to bfloat16, the kernel's output dtype)
                eye = torch.eye(self.in_features, dtype=self.kernel_dtype)
                w = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero).float().T
            else:
                n, k = self.q.shape
                sz = self.scale_zero.float().transpose(0, 1)  # [n, k / group, 2]
                g = self.q.float().view(n, k // self.group_size, self.group_size)
                w = ((g - 8.0) * sz[..., :1] + sz[..., 1:]).view(n, k)
        return w if padded else w[: self.out_features]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed if self.packed is not None else self.q, self.scales, self.scale_zero, self.bias)


class Int8GroupLinear(Linear):
    """Symmetric int8 weights with one scale per 32 input channels (GGUF's Q8_0 grid, so a Q8_0 tensor, like
    a Q4 GGUF's tied embedding / LM head, is held without loss), computed by the project's integer-dot kernel
    (AVX512-VNNI or AVX2; ``int8_group_linear`` in ``engine/csrc/int4_linear.cpp``: activations int8 per group of 32, integer
    dots). CPU with :func:`int4_vnni_available` only; :func:`make_head` picks it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        n, k = weight.shape
        if k % 32:
            raise ValueError(f"int8 groups: in_features {k} is not a multiple of 32")
        if not int4_vnni_available():
            raise ValueError("int8 groups: the vnni kernel is not built for this CPU (see engine.cpu_kernels)")
        self.out_features, self.in_features = n, k
        padded_n = -(-n // INT4_N_MULTIPLE) * INT4_N_MULTIPLE
        w = torch.zeros(padded_n, k, dtype=torch.float32)
        w[:n] = weight.float()
        groups = w.view(padded_n, k // 32, 32)
        scale = (groups.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)  # [padded_n, k / 32]
        q = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8)
        blocks = padded_n // 16
        self.packed = q.view(blocks, 16, k // 4, 4).permute(0, 2, 1, 3).reshape(blocks, k // 4, 64).contiguous()
        self.scales = scale.view(blocks, 16, k // 32).permute(0, 2, 1).contiguous()
        self.offsets = (128 * q.sum(dim=-1, dtype=torch.int32)).view(blocks, 16, k // 32).permute(0, 2, 1).contiguous()
        self.bias = None if bias is None else bias.to(compute_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y = torch.ops.splitserve_cpu.int8_group_linear(x2, self.packed, self.scales, self.offsets, self.out_features)
        return self._add_bias(y.view(*shape[:-1], self.out_features))

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with."""
        blocks, chunks, _ = self.packed.shape
        n, k = blocks * 16, chunks * 4
        q = self.packed.view(blocks, chunks, 16, 4).permute(0, 2, 1, 3).reshape(n, k // 32, 32).float()
        scale = self.scales.permute(0, 2, 1).reshape(n, k // 32, 1)
        return (q * scale).view(n, k)[: self.out_features]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scales, self.offsets, self.bias)


@functools.cache
def w8a8_activation_levels() -> int:
    """Steps on each side of zero for w8a8 activations on this CPU: 127 with VNNI (an int8 dot product
    that adds into 32 bits); without it fbgemm's u8 x s8 kernel sums pairs of products in int16 with
    saturation, and 7-bit activations (63, PyTorch's ``reduce_range``) keep every pair below 2**15.
    Read once, when the first w8a8 layer is built (no import-time I/O)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 63
    return 127 if any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")) else 63


class W8A8Linear(Linear):
    """int8 weights (symmetric, one scale per output channel) and int8 activations (symmetric, one scale
    per row, taken at each call): an int8 x int8 GEMM with 32-bit sums (fbgemm's kernels, VNNI where the
    CPU has it), de-quantized to float32.

    Rows are divided by their own absolute maximum before the call, so the kernel's one fixed input scale
    is a per-row scale: each row's result does not depend on the other rows of the batch. The int8
    products run 2-3x faster than the weight-only kernels from 8 rows on (3072 x 576, one thread:
    77-88 µs vs 182 int4, 233 bf16 dense) and level with int4 at one row. Off the CPU (no fbgemm) the same
    arithmetic runs de-quantized: correct, not fast.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 packed: bool | None = None) -> None:
        """``packed``: through fbgemm's kernel (default: on the CPU) or the de-quantized arithmetic."""
        self.out_features, self.in_features = weight.shape
        q, scale = int8_per_channel(weight)
        self.levels = w8a8_activation_levels()
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else bias.to(compute_dtype)
        if weight.device.type == "cpu" if packed is None else packed:
            with warnings.catch_warnings():  # PyTorch marks its quantized-tensor constructors deprecated;
                warnings.simplefilter("ignore")  # this one is still the only way into fbgemm's prepacking
                qweight = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(),
                                                     torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)
            self.qweight = self.scale = None
        else:
            self.packed = None
            self.qweight, self.scale = q, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        row_max = x2.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
        if self.packed is not None:
            # levels + 1 is the zero point: the unit-range rows land on [1, 2 * levels + 1] of uint8
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x2 / row_max, 1.0 / self.levels, self.levels + 1, self.packed) * row_max
        else:
            xq = torch.round(x2 / row_max * self.levels) * (row_max / self.levels)
            y = F.linear(xq, self.qweight.float() * self.scale[:, None])
        return self._add_bias(y.to(x.dtype).view(*shape[:-1], self.out_features))

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features + self.out_features * 4 + _nbytes(self.bias)

    def dequantized(self) -> torch.Tensor:
        if self.packed is not None:
            qweight, _ = self.packed.unpack()
            return qweight.dequantize()
        return self.qweight.float() * self.scale[:, None]


class ByRows(Linear):
    """One weight held two ways, chosen by the number of rows: ``few`` (a quantized GEMV kernel) up to
    ``max_rows`` rows, else ``many`` (a dense GEMM). Used for a tied LM head: ``many`` is the embedding
    matrix the engine keeps anyway, so the dense path costs no memory."""

    def __init__(self, few: Linear, many: DenseLinear, max_rows: int) -> None:
        self.few, self.many, self.max_rows = few, many, max_rows
        self.in_features, self.out_features, self.bias = few.in_features, few.out_features, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return self.few(x) if rows <= self.max_rows else self.many(x).to(x.dtype)

    @property
    def nbytes(self) -> int:
        """The few-rows path's bytes (what a small decode step reads); the dense weight is shared."""
        return self.few.nbytes

    def bytes_read(self, rows: int) -> int:
        return self.few.nbytes if rows <= self.max_rows else self.many.nbytes


def int4_group_size(in_features: int) -> int | None:
    """The smallest supported group size that divides ``in_features`` (None: none does)."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str,
                compute_dtype: torch.dtype) -> Linear:
    """``weight`` ([out, in], any float dtype; quantize from the most precise copy you have) in a format.

    int4 needs ``in_features`` divisible by 32; a layer where it is not falls back to int8.
    """
    if quantization == "none":
        return DenseLinear(weight.to(compute_dtype).contiguous(), None if bias is None else bias.to(compute_dtype))
    if quantization == "int8":
        return Int8Linear(weight, bias, compute_dtype)
    if quantization == "w8a8":
        return W8A8Linear(weight, bias, compute_dtype)
    if quantization == "int4":
        group = int4_group_size(weight.shape[1])
        if group is None:
            return Int8Linear(weight, bias, compute_dtype)
        return Int4Linear(weight, bias, compute_dtype, group)
    raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
