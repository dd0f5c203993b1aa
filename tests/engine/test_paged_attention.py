"""The in-place paged decode attention kernel (engine/csrc) against float32 SDPA over the gathered blocks,
its refusals of bad tables, and the engine reading its cache through it."""

import pytest
import torch

from engine.decode_attention import gather_heads_major, sdpa_attention
from engine.paged_attention import paged_decode_kernel

kernel = paged_decode_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="the paged attention kernel did not build here (see the log)")


def scattered_cache(gen, dtype, kv_heads=3, dim=64, block_size=16, num_blocks=64):
    """One layer's heads-major cache ``[2, KV, slots, D]`` of random values."""
    return torch.randn(2, kv_heads, num_blocks * block_size, dim, generator=gen).to(dtype)


def reference(q, cache, tables, lens, block_size, scale):
    """Float32 SDPA over each sequence's gathered blocks, masked by length."""
    kv_heads, dim = cache.shape[1], cache.shape[3]
    view = cache.view(2, kv_heads, -1, block_size, dim)
    k, v = gather_heads_major(view, tables.flatten(), q.shape[0])
    mask = (torch.arange(k.shape[2])[None, :] < lens[:, None])[:, None, None, :]
    return sdpa_attention(q.float(), k.float(), v.float(), mask, scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("batch", [1, 5])
def test_matches_sdpa_over_scattered_blocks_of_different_lengths(dtype, tol, batch):
    gen = torch.Generator().manual_seed(batch)
    heads, kv_heads, dim, block_size, num_blocks = 9, 3, 64, 16, 64
    cache = scattered_cache(gen, dtype, kv_heads, dim, block_size, num_blocks)
    max_blocks = 7
    tables = torch.randperm(num_blocks, generator=gen)[:batch * max_blocks].view(batch, max_blocks)
    lens = torch.tensor([max_blocks * block_size - 13 * i for i in range(batch)])  # partial last blocks
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    scale = dim**-0.5
    out = kernel(q, cache, tables, lens, block_size, scale)
    assert out.shape == (batch, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(q, cache, tables, lens, block_size, scale), atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("lens", [[700], [700, 20], [700, 5]])
def test_keys_split_across_threads_combine_to_the_same_attention(threads, lens):
    """Fewer (sequence, KV head) pairs than twice the threads: each pair's keys are split into ranges whose
    partial softmaxes are combined (bfloat16, head size 64); a short sequence's later ranges are empty."""
    gen = torch.Generator().manual_seed(len(lens))
    heads, kv_heads, dim, block_size, num_blocks = 9, 3, 64, 16, 160
    cache = scattered_cache(gen, torch.bfloat16, kv_heads, dim, block_size, num_blocks)
    max_blocks = -(-max(lens) // block_size)
    tables = torch.randperm(num_blocks, generator=gen)[:len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), heads, dim, generator=gen).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernel(q, cache, tables, torch.tensor(lens), block_size, dim**-0.5)
    finally:
        torch.set_num_threads(before)
    want = reference(q, cache, tables, torch.tensor(lens), block_size, dim**-0.5)
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)


def test_keys_past_a_sequences_length_and_blocks_outside_its_table_are_never_read():
    gen = torch.Generator().manual_seed(7)
    block_size, dim, num_blocks = 4, 16, 16
    cache = scattered_cache(gen, torch.bfloat16, 2, dim, block_size, num_blocks)
    tables = torch.tensor([[3, 9, 6], [5, 0, 0]])  # sequence 1's row padded with block 0
    lens = torch.tensor([9, 2])  # sequence 0: blocks 3 and 9 whole, slot 0 of block 6; sequence 1: 2 keys of 5
    q = torch.randn(2, 4, dim, generator=gen).to(torch.bfloat16)
    before = kernel(q, cache, tables, lens, block_size, 0.25)
    poisoned = torch.full_like(cache, 1e4).view(2, 2, num_blocks, block_size, dim)
    blocks = cache.view_as(poisoned)
    for block, used in ((3, 4), (9, 4), (6, 1), (5, 2)):
        poisoned[:, :, block, :used] = blocks[:, :, block, :used]
    after = kernel(q, poisoned.view_as(cache), tables, lens, block_size, 0.25)
    assert torch.equal(before, after)


@pytest.mark.parametrize("tables,lens,message", [
    ([[0, 99]], [20], "out of range"),
    ([[0, -1]], [20], "out of range"),
    ([[0, 1]], [33], "beyond its table"),
    ([[0, 1]], [0], "beyond its table"),
])
def test_a_bad_table_or_length_raises_instead_of_reading_outside_the_cache(tables, lens, message):
    cache = torch.zeros(2, 1, 4 * 16, 8, dtype=torch.bfloat16)
    q = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=message):
        kernel(q, cache, torch.tensor(tables), torch.tensor(lens), 16, 1.0)


def test_mismatched_inputs_are_refused():
    cache = torch.zeros(2, 1, 64, 8, dtype=torch.bfloat16)
    lens, tables = torch.tensor([3]), torch.tensor([[0]])
    with pytest.raises(RuntimeError, match="dtype"):
        kernel(torch.zeros(1, 2, 8), cache, tables, lens, 16, 1.0)
    with pytest.raises(RuntimeError, match="head_dim"):
        kernel(torch.zeros(1, 2, 4, dtype=torch.bfloat16), cache, tables, lens, 16, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        kernel(torch.zeros(1, 2, 8, dtype=torch.bfloat16), cache, tables.int(), lens, 16, 1.0)


def test_the_engine_decodes_through_the_kernel_as_through_the_gather():
    """A bfloat16 engine picks the kernel; at every decode-only step its logits match the gather path's
    over the same cache (both a float32 softmax; within bfloat16 rounding)."""
    from engine.llm_engine import LLMEngine
    from engine.model_loader import load_model
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(load_model("builtin:tiny-llama", dtype="bfloat16"), block_size=4, num_blocks=64, max_running=4)
    runner = engine.runner
    assert runner.paged_decode is kernel
    execute, diffs = runner.execute, []

    def both(chunks, kv):
        if not all(c.num_tokens == 1 and c.start > 0 for c in chunks):
            return execute(chunks, kv)
        runner.paged_decode = None
        _, gathered = execute(chunks, kv)
        runner.paged_decode = kernel  # last, so the cache keeps what the kernel path wrote
        sampled, logits = execute(chunks, kv)
        diffs.append(((logits.float() - gathered.float()).abs().max() / gathered.float().abs().max()).item())
        return sampled, logits

    runner.execute = both
    gen = torch.Generator().manual_seed(3)
    for i, n in enumerate((5, 23, 2)):
        engine.add_request(f"r{i}", params=SamplingParams(max_tokens=12, ignore_eos=True),
                           prompt_token_ids=torch.randint(3, 200, (n,), generator=gen).tolist())
    while engine.has_unfinished():
        engine.step()
    assert len(diffs) >= 10
    assert max(diffs) < 5e-2, diffs  # a kernel that drops the newest key: 0.2 and more


def _kernel_in_subprocess(extensions_dir, extra_env=None, timeout=300):
    """Run ``paged_decode_kernel()`` in a fresh process with its own kernel cache; (return code, output)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir), **(extra_env or {}))
    code = ("import logging; logging.basicConfig(); from engine.paged_attention import paged_decode_kernel; "
            "print('KERNEL', paged_decode_kernel() is not None)")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_without_a_compiler_the_runner_falls_back_to_the_gather_with_a_warning(tmp_path):
    proc = _kernel_in_subprocess(tmp_path, {"CXX": str(tmp_path / "no-such-compiler")})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "KERNEL False" in out, out
    assert "paged attention kernel unavailable, decode attention gathers K/V instead" in out


def test_a_builder_killed_mid_build_leaves_nothing_that_blocks_the_next(tmp_path):
    import time

    first = _kernel_in_subprocess(tmp_path)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob("splitserve/*-*/")) and time.monotonic() < deadline:  # its private build dir
        time.sleep(0.1)
    time.sleep(1.0)  # the compiler is running
    first.kill()
    first.wait()
    second = _kernel_in_subprocess(tmp_path)
    out, _ = second.communicate(timeout=300)  # builds again instead of waiting on the dead builder
    assert second.returncode == 0 and "KERNEL True" in out, out
    assert len(list(tmp_path.glob("splitserve/*.so"))) == 1
