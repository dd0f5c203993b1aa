"""Weight formats: each quantized Linear computes what its de-quantized weight would,
within the format's own error, through PyTorch's packed CPU kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quant import (DenseLinear, Int4Linear, Int8GroupLinear, Int8Linear, W8A8Linear, int4_group_size, int4_vnni_available,
                          make_linear, pack_int4_blocks, unpack_int4_blocks)


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


KERNELS = [pytest.param("vnni", marks=pytest.mark.skipif(not int4_vnni_available(), reason="no AVX512-VNNI kernel here")),
           "torch", "dequantize"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [96, 100])  # 100: not a multiple of 16, padded
def test_int4_kernel_matches_its_dequantized_weight(n, kernel):
    w, x = _weight(n, 64, seed=n), torch.randn(3, 64)
    bias = torch.randn(n)
    lin = Int4Linear(w, bias, torch.bfloat16, 32, kernel=kernel)
    assert lin.kernel == kernel and lin.group_size == 32
    deq = lin.dequantized()
    assert deq.shape == (n, 64)
    y = lin(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == (3, n)
    # bf16 in and out (and, for vnni, int8 activations: ~0.4 % of a group's largest value)
    torch.testing.assert_close(y.float(), x @ deq.T + bias, atol=0.1, rtol=0.02)
    group_range = w.view(n, 2, 32).amax(-1) - w.view(n, 2, 32).amin(-1)
    step = group_range / 15 + (0.02 if kernel == "torch" else 0.0)  # torch's layout unpacks through bf16
    assert ((deq - w).abs().view(n, 2, 32).amax(-1) <= step).all()  # within one step of its group


def test_make_linear_picks_the_vnni_kernel_where_it_is_built():
    lin = make_linear(_weight(96, 64), None, "int4", torch.bfloat16)
    assert isinstance(lin, Int4Linear) and lin.kernel == ("vnni" if int4_vnni_available() else "torch")
    with pytest.raises(ValueError, match="kernel"):
        Int4Linear(_weight(96, 64), None, torch.bfloat16, 32, kernel="avx9")


def test_int4_block_layout_round_trips():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (32, 96), generator=g)
    scale, minimum = torch.rand(32, 3, generator=g), -torch.rand(32, 3, generator=g)
    packed, scales = pack_int4_blocks(q, scale, minimum)
    assert packed.shape == (2, 12, 64) and packed.dtype == torch.uint8 and scales.shape == (2, 3, 2, 16)
    # byte 4r + i of chunk c: row r's weights 8c + i (low nibble) and 8c + 4 + i (high nibble)
    assert packed[1, 5, 4 * 7 + 2].item() == q[16 + 7, 42].item() | (q[16 + 7, 46].item() << 4)
    expect = q.float().view(32, 3, 32) * scale.bfloat16().float()[..., None] + minimum.bfloat16().float()[..., None]
    assert torch.equal(unpack_int4_blocks(packed, scales), expect.view(32, 96))


@pytest.mark.skipif(not int4_vnni_available(), reason="no AVX512-VNNI kernel here")
@pytest.mark.parametrize("rows", [1, 3, 4, 9])  # tiles of 4 rows, and the remainders
@pytest.mark.parametrize("dtype", [torch.float32])
def test_vnni_kernel_computes_its_documented_formula(rows, dtype):
    """y = sum_g scale * sx * dot(q, round(x / sx)) + minimum * sum(x), sx = max|x| / 127 per group of 32.

    float32 activations: bfloat16 ones often land exactly on a rounding tie of x / sx, which the kernel and
    this reference may break differently (one int8 step; the bf16 path is checked against the weight above)."""
    w, x = _weight(48, 96, seed=rows), torch.randn(rows, 96).to(dtype)
    x[0, :32] = 0.0  # an all-zero group: sx = 0, contributes nothing but its minimum * 0
    lin = Int4Linear(w, None, dtype, 32, kernel="vnni")
    y = torch.ops.splitserve_cpu.int4_linear(x, lin.packed, lin.scales, 48)
    assert y.dtype == dtype and y.shape == (rows, 48)
    xg = x.double().view(rows, 3, 32)
    sx = xg.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(sx > 0, torch.round(xg / torch.where(sx > 0, sx, 1.0)), 0.0) * sx  # the de-quantized int8 x
    minimum = lin.scales[:, :, 1, :].permute(0, 2, 1).reshape(48, 3).double()  # [rows of W, groups]
    scaled_q = lin.dequantized().double() - minimum.repeat_interleave(32, dim=1)
    ref = xq.view(rows, 96) @ scaled_q.T + xg.sum(-1) @ minimum.T  # the minimum meets the exact sum of x
    tol = 2e-3 if dtype == torch.bfloat16 else 1e-5  # the output's rounding; float32 sums in another order
    torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.skipif(not int4_vnni_available(), reason="no AVX512-VNNI kernel here")
def test_vnni_kernel_refuses_what_its_layout_cannot_hold():
    lin = Int4Linear(_weight(48, 96), None, torch.bfloat16, 32, kernel="vnni")
    op = torch.ops.splitserve_cpu.int4_linear
    with pytest.raises(RuntimeError, match="n_out 64 does not fit 3 blocks"):
        op(torch.randn(1, 96).bfloat16(), lin.packed, lin.scales, 64)
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        op(torch.randn(1, 64).bfloat16(), lin.packed, lin.scales, 48)
    with pytest.raises(RuntimeError, match="x must be bfloat16, float16 or float32"):
        op(torch.randn(1, 96).double(), lin.packed, lin.scales, 48)


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


@pytest.mark.skipif(not int4_vnni_available(), reason="no AVX512-VNNI kernel here")
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int8_group_kernel_holds_a_q8_0_grid_exactly_and_computes_its_formula(rows):
    """A weight on GGUF's Q8_0 grid (int8 times one scale per 32 channels) is held without loss; y is
    sum_g scale * sx * dot(q, round(x / sx)) over groups of 32, with sx = max|x| / 127."""
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (40, 96), generator=g).float()
    q[:, ::32] = 127.0  # each group reaches the grid's end, as a Q8_0 group's largest value does
    w = (q.view(40, 3, 32) * (torch.rand(40, 3, 1, generator=g) * 1e-3)).view(40, 96)
    lin = Int8GroupLinear(w, None, torch.bfloat16)
    assert torch.allclose(lin.dequantized(), w, rtol=1e-6, atol=0)
    x = torch.randn(rows, 96, generator=g)
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 40)
    xg = x.double().view(rows, 3, 32)
    sx = xg.abs().amax(-1, keepdim=True) / 127
    ref = (torch.round(xg / sx) * sx).view(rows, 96) @ lin.dequantized().double().T
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    with pytest.raises(RuntimeError, match="n_out 60 does not fit 3 blocks"):
        torch.ops.splitserve_cpu.int8_group_linear(x, lin.packed, lin.scales, lin.offsets, 60)


@pytest.mark.skipif(not int4_vnni_available(), reason="no AVX512-VNNI kernel here")
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_quantized_format_keeps_its_head_on_the_int8_group_grid(quantization):
    from engine.model_loader import TINY_MODEL, load_model

    weights = load_model(TINY_MODEL, dtype="bfloat16", quantization=quantization).weights
    assert isinstance(weights.lm_head, Int8GroupLinear)
    assert (weights.lm_head.out_features, weights.lm_head.in_features) == tuple(weights.embed.shape)


@pytest.mark.parametrize("vnni", [True, False])
def test_a_tied_int4_head_is_never_held_in_int4(monkeypatch, vnni):
    """An int4 head fails int4's quality bar (benchmarks.quality: +5.4 % perplexity on the shipped model):
    with the VNNI kernel the tied head is int8 per group of 32, without it the dense embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import engine.llama_weights as llama_weights

    if vnni and not int4_vnni_available():
        pytest.skip("no AVX512-VNNI kernel here")
    if not vnni:
        monkeypatch.setattr(llama_weights, "int4_vnni_available", lambda: False)
        monkeypatch.setattr("engine.quant.int4_kernel_for", lambda device, group_size: "torch")
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    weights = llama_weights.build_weights(model, llama_weights.WeightFormat("bfloat16", "int4"), 32)
    assert weights.layers[0].qkv.kernel == ("vnni" if vnni else "torch")
    if vnni:
        assert isinstance(weights.lm_head, Int8GroupLinear)
    else:
        assert isinstance(weights.lm_head, DenseLinear) and weights.lm_head.weight.data_ptr() == weights.embed.data_ptr()
    x = torch.randn(3, 64).bfloat16()
    torch.testing.assert_close(weights.lm_head(x).float(), x.float() @ weights.embed.float().T, atol=0.05, rtol=0.02)
