"""Weight formats: each quantized Linear computes what its de-quantized weight would,
within the format's own error, through PyTorch's packed CPU kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quant import DenseLinear, Int4Linear, Int8Linear, W8A8Linear, int4_group_size, make_linear


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int8_kernel_matches_its_dequantized_weight():
    w, x = _weight(96, 64), torch.randn(5, 64)
    lin = make_linear(w, None, "int8", torch.float32)
    assert isinstance(lin, Int8Linear) and lin.qweight.dtype == torch.int8
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (5, 96)
    # bfloat16 activations inside the kernel: compare at bf16 precision.
    torch.testing.assert_close(y, x @ lin.dequantized().T, atol=0.05, rtol=0.02)
    assert (lin.dequantized() - w).abs().max() <= w.abs().amax() / 127  # half a step per channel at most


@pytest.mark.parametrize("n", [96, 100])  # 100: not a multiple of 16, padded
def test_int4_kernel_matches_its_dequantized_weight(n):
    w, x = _weight(n, 64, seed=n), torch.randn(3, 64)
    bias = torch.randn(n)
    lin = make_linear(w, bias, "int4", torch.bfloat16)
    assert isinstance(lin, Int4Linear) and lin.group_size == 32
    q = torch.round((w.view(n, 2, 32) - w.view(n, 2, 32).amin(-1, keepdim=True))
                    / lin.scale_zero[:, :n, 0].float().T[..., None]).clamp(0, 15)
    deq = lin._dequantize(torch.cat([q.view(n, 64), torch.zeros(lin.scale_zero.shape[1] - n, 64)]))[:n]
    y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (3, n)
    torch.testing.assert_close(y.float(), x @ deq.T + bias, atol=0.1, rtol=0.02)  # bf16 in and out
    group_range = w.view(n, 2, 32).amax(-1) - w.view(n, 2, 32).amin(-1)
    assert ((deq - w).abs().view(n, 2, 32).amax(-1) <= group_range / 15).all()  # within one step of its group


def test_int4_falls_back_to_int8_where_no_group_divides_the_width():
    assert int4_group_size(576) == 32 and int4_group_size(1536) == 32 and int4_group_size(40) is None
    assert isinstance(make_linear(_weight(32, 40), None, "int4", torch.float32), Int8Linear)


def test_formats_shrink_the_weight_and_dense_is_plain():
    w = _weight(128, 256)
    dense = make_linear(w, None, "none", torch.float32)
    assert isinstance(dense, DenseLinear) and torch.equal(dense(torch.eye(256))[:, :3], w.T[:, :3])
    sizes = {q: make_linear(w, None, q, torch.float32).nbytes for q in ("none", "int8", "int4", "w8a8")}
    assert sizes["int8"] < sizes["none"] / 3 and sizes["int4"] < sizes["int8"] * 0.65
    assert sizes["w8a8"] == sizes["int8"] + 128 * 2  # int8 weight, float32 (not bfloat16) channel scales
    with pytest.raises(ValueError, match="quantization"):
        make_linear(w, None, "int3", torch.float32)


def test_int8_many_rows_take_the_dequantized_gemm_and_agree():
    from engine.quant import INT8_PACKED_MAX_ROWS

    w = _weight(64, 128, seed=3)
    lin = make_linear(w, None, "int8", torch.bfloat16)
    x = torch.randn(INT8_PACKED_MAX_ROWS + 8, 128).bfloat16()
    many = lin(x)  # one call over every row: the de-quantized path
    few = torch.cat([lin(x[i:i + 8]) for i in range(0, x.shape[0], 8)])  # the packed kernel, 8 rows at a time
    torch.testing.assert_close(many.float(), few.float(), atol=0.03, rtol=0.02)


def test_by_rows_takes_the_quantized_kernel_for_few_rows_only():
    from engine.quant import ByRows

    w = _weight(64, 128, seed=4)
    few = make_linear(w, None, "int8", torch.bfloat16)
    head = ByRows(few, DenseLinear(w.bfloat16()), max_rows=4)
    x = torch.randn(6, 128).bfloat16()
    assert torch.equal(head(x[:4]), few(x[:4]))                 # 4 rows: the int8 kernel
    assert torch.equal(head(x), F.linear(x, w.bfloat16()))     # 6 rows: the dense weight
    assert head.nbytes == few.nbytes


def _w8a8_reference(lin: W8A8Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What the format computes, in plain float64: each row rounded to ``levels`` steps of its own
    absolute maximum, times the de-quantized weight."""
    x = x.double()
    row_max = x.abs().amax(-1, keepdim=True)
    xq = torch.round(x / row_max * lin.levels) * row_max / lin.levels
    y = xq @ lin.dequantized().double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_kernel_computes_per_row_quantized_activations_times_int8_weights(dtype):
    w, bias = _weight(96, 128, seed=5), torch.randn(96)
    lin = make_linear(w, bias, "w8a8", dtype)
    assert isinstance(lin, W8A8Linear) and lin.packed is not None  # fbgemm's packed weight on the CPU
    assert (lin.dequantized() - w).abs().max() <= w.abs().amax() / 127  # half a step per channel at most
    x = torch.randn(7, 128).to(dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (7, 96)
    # The kernel's arithmetic is exact in int32; what is left is the output's rounding to dtype.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), _w8a8_reference(lin, x.float(), bias), atol=tol, rtol=tol)


def test_w8a8_rows_do_not_depend_on_each_other():
    """Per-row activation scales: a row gives the same result alone as in any batch, even next to a row
    a thousand times larger (a per-tensor scale would flatten the small one to a few steps)."""
    lin = make_linear(_weight(64, 128, seed=6), None, "w8a8", torch.float32)
    x = torch.randn(4, 128)
    x[1] *= 1000.0
    together = lin(x)
    for i in range(4):
        torch.testing.assert_close(lin(x[i:i + 1]), together[i:i + 1], atol=0, rtol=0)
    rel = (together[0] - x[0] @ lin.dequantized().T).norm() / together[0].norm()
    assert rel < 0.02


def test_w8a8_off_the_cpu_path_computes_the_same_arithmetic():
    """The path a GPU takes (no fbgemm): the de-quantized weight and the same per-row rounding."""
    w = _weight(32, 64, seed=7)
    cpu = W8A8Linear(w, None, torch.float32)
    plain = W8A8Linear(w, None, torch.float32, packed=False)
    assert plain.packed is None and torch.equal(plain.dequantized(), cpu.dequantized())
    x = torch.randn(5, 64)
    torch.testing.assert_close(plain(x), cpu(x), atol=1e-4, rtol=1e-4)
