"""Decode attention over a 16-bit paged cache: the in-place kernel, the grouped path and SDPA, side by side in one run.

Run from the repository root::

    python -m benchmarks.decode_attention [--quantization int4] [--batches 1,8,64] [--rounds 5]

Loads SmolLM2-135M-Instruct in bfloat16 (weights in ``--quantization``, the
default deployment's decode format), then, in one process:

1. **One layer's attention** (gather from the paged cache included) for each
   batch: SDPA on the 16-bit K/V (the path :mod:`engine.decode_attention`
   replaced), SDPA on K/V upcast to float32, and the batched products
   (``products``) — each over the heads-major cache's one-copy gather — and
   the products over the previous token-major cache (one strided gather per
   head; ``layout gain`` is its time over the heads-major one), and the
   kernel that reads the paged cache in place (``in place``,
   :mod:`engine.paged_attention`; no gather) — medians of interleaved
   rounds, in µs, with the ratios of the best gather path to SDPA and of the
   kernel to the best gather path.
2. **Whole decode steps** of the engine at each batch (~256 keys of
   context), the runner switched between SDPA, the gather path it picks for
   a 16-bit cache without the kernel (:mod:`engine.decode_attention`) and
   the in-place kernel, in turn on successive steps of the same requests, so
   all see the same machine: median ms/step and the speed-ups.

The machine is shared: each phase prints how many cores other processes used
meanwhile (``other_cpu_cores``); compare figures from one run only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch

from benchmarks.engine import Contention, make_engine, random_prompt
from engine.decode_attention import (UPCAST_MAX_BATCH, gather_heads_major, heads_major_attention, sdpa_attention,
                                     upcast_sdpa_attention)
from engine.format_names import QUANTIZATIONS
from engine.model_loader import load_model
from engine.paged_attention import paged_decode_kernel
from engine.sampling_params import SamplingParams

CONTEXT = 256        # prompt tokens per sequence: the keys each decode step attends to
BLOCK_SIZE = 16


def token_major_gather(blocks: torch.Tensor, flat: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather of the cache's previous, token-major layout (``[2, num_blocks, block_size, KV, D]``): one
    strided copy per (K or V, head) into the heads-major order; the variant the layout change was measured against."""
    kv_heads, dim = blocks.shape[3], blocks.shape[4]
    out = torch.empty((2, kv_heads, flat.shape[0], blocks.shape[2], dim), dtype=blocks.dtype)
    for which in range(2):
        for h in range(kv_heads):
            torch.index_select(blocks[which, :, :, h], 0, flat, out=out[which, h])
    k, v = out.view(2, kv_heads, batch, -1, dim).unbind(0)
    return k, v


def _median_us(fns: dict[str, Callable[[], object]], rounds: int, reps: int) -> dict[str, float]:
    """Median µs per call of each function, rounds interleaved across the functions."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - t0) / reps * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def layer_attention(batch: int, heads: int, kv_heads: int, head_dim: int, rounds: int) -> dict[str, float]:
    """One layer's decode attention at ``batch`` rows, five ways (four without the kernel; module docstring, 1)."""
    gen = torch.Generator().manual_seed(batch)
    blocks_per_seq = -(-(CONTEXT + 16) // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq * 2
    blocks = torch.randn(2, kv_heads, num_blocks, BLOCK_SIZE, head_dim, generator=gen).to(torch.bfloat16)
    token_major = blocks.permute(0, 2, 3, 1, 4).contiguous()  # the same K/V in the previous layout
    flat = torch.randperm(num_blocks, generator=gen)[:batch * blocks_per_seq]
    q = torch.randn(batch, heads, head_dim, generator=gen).to(torch.bfloat16)
    keys = blocks_per_seq * BLOCK_SIZE
    mask = (torch.arange(keys)[None, :] < CONTEXT + 4)[:, None, None, :].expand(batch, 1, 1, keys)
    scale = head_dim**-0.5

    def timed(path, gather=gather_heads_major, cache=blocks):
        def call():
            k, v = gather(cache, flat, batch)
            return path(q, k, v, mask, scale)
        return call

    paths = {"sdpa_bf16": timed(sdpa_attention), "sdpa_fp32": timed(upcast_sdpa_attention),
             "heads_major": timed(heads_major_attention),
             "token_major": timed(heads_major_attention, token_major_gather, token_major)}
    kernel = paged_decode_kernel()
    if kernel is not None:  # in place: the block tables and lengths are all it is given
        layer_kv = blocks.view(2, kv_heads, num_blocks * BLOCK_SIZE, head_dim)
        tables, lens = flat.view(batch, blocks_per_seq), torch.full((batch,), CONTEXT + 4)
        paths["in_place"] = lambda: kernel(q, layer_kv, tables, lens, BLOCK_SIZE, scale)
    return _median_us(paths, rounds, max(3, 60 // batch))


def engine_steps(loaded, batch: int, steps: int) -> dict[str, float]:
    """Median ms of whole decode steps through SDPA, the grouped gather path and (where it builds) the in-place
    kernel, in turn on successive steps."""
    engine = make_engine(loaded, batch, CONTEXT + 3 * steps + 16, batch * CONTEXT)
    params = SamplingParams(max_tokens=3 * steps + 8, ignore_eos=True)  # three paths, `steps` steps each
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", params=params,
                           prompt_token_ids=random_prompt(random.Random(i), CONTEXT, loaded.config.vocab_size))
    while len(engine.step()) < batch:  # prefill until every sequence decodes
        pass
    for _ in range(2):
        engine.step()
    kernel = engine.runner.paged_decode
    paths = {"sdpa_ms": (True, None), "grouped_ms": (False, None)}  # (runner.sdpa_decode, runner.paged_decode)
    if kernel is not None:
        paths["in_place_ms"] = (False, kernel)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(len(paths) * steps):
        name = list(paths)[i % len(paths)]
        engine.runner.sdpa_decode, engine.runner.paged_decode = paths[name]
        t0 = time.perf_counter()
        outs = engine.step()
        times[name].append(time.perf_counter() - t0)
        if len(outs) != batch:
            raise RuntimeError(f"decode step at batch {batch} produced {len(outs)} tokens")
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quantization", default="int4", choices=QUANTIZATIONS)
    parser.add_argument("--batches", default="1,8,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per layer measurement")
    parser.add_argument("--steps", type=int, default=8, help="timed engine steps per path and batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if paged_decode_kernel() is None:
        print("the in-place kernel did not build here (see the warning above): its columns are left out")
    loaded = load_model(dtype="bfloat16", quantization=args.quantization)
    w = loaded.weights
    print(f"bfloat16 cache, weights {args.quantization}, {torch.get_num_threads()} threads, "
          f"~{CONTEXT} keys; the grouped path upcasts to float32 SDPA up to {UPCAST_MAX_BATCH} rows")
    print("\none layer's attention, gather included (µs, median of interleaved rounds)")
    print(f"{'batch':>5} {'SDPA bf16':>10} {'SDPA fp32':>10} {'products':>10} {'token-major':>12} {'in place':>9} "
          f"{'best gather vs SDPA bf16':>25} {'layout gain':>12} {'in place vs best gather':>24} {'others':>7}")
    for b in batches:
        with Contention() as busy:
            r = layer_attention(b, w.num_heads, w.num_kv_heads, w.head_dim, args.rounds)
        best = min(r["sdpa_fp32"], r["heads_major"])
        in_place = r.get("in_place")
        print(f"{b:>5} {r['sdpa_bf16']:>10.0f} {r['sdpa_fp32']:>10.0f} {r['heads_major']:>10.0f} "
              f"{r['token_major']:>12.0f} {_or_dash(in_place, '.0f'):>9} {r['sdpa_bf16'] / best:>24.2f}x "
              f"{r['token_major'] / r['heads_major']:>11.2f}x "
              f"{_or_dash(in_place and best / in_place, '.2f', 'x'):>24} {busy.cores or 0:>7.2f}")
    print("\nwhole decode steps (ms, median; the paths in turn on successive steps)")
    print(f"{'batch':>5} {'SDPA':>9} {'grouped':>9} {'in place':>9} {'grouped vs SDPA':>16} "
          f"{'in place vs grouped':>20} {'others':>7}")
    for b in batches:
        with Contention() as busy:
            r = engine_steps(loaded, b, args.steps)
        in_place = r.get("in_place_ms")
        print(f"{b:>5} {r['sdpa_ms']:>9.1f} {r['grouped_ms']:>9.1f} {_or_dash(in_place, '.1f'):>9} "
              f"{r['sdpa_ms'] / r['grouped_ms']:>15.2f}x "
              f"{_or_dash(in_place and r['grouped_ms'] / in_place, '.2f', 'x'):>20} {busy.cores or 0:>7.2f}")


def _or_dash(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or "-" where there is none (no kernel)."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


if __name__ == "__main__":
    main()
