"""Engine benchmark: decode, prefill and a mixed workload against on-the-spot rooflines.

Run from the repository root::

    python -m benchmarks.engine [--json PATH] [--quick] [--wait-quiet SECONDS]

Everything runs in one process on SmolLM2-135M-Instruct (float32, CPU),
loaded once. MBU and MFU are fractions of peaks measured in the same run, never
of a spec sheet (see docs/architecture.md, Measurement).

What it measures, in order:

1. **Machine peaks.** Memory bandwidth is the best of a few ``dst.copy_(src)``
   of a 256 MB tensor, counting read + write (2x the size) as bytes moved.
   Float32 FLOP/s is the best of a few 2048x2048 @ 2048x2048 matmuls. Both use
   torch's default thread count (:mod:`analysis.machine_peaks`). Shared machines drift,
   so both are measured again at the end; the rooflines use the higher of the
   two (the stricter bound), and both samples are reported.
2. **Decode** at batch 1, 8, 32 and 64 with ~256 tokens of context: B
   requests with 256 random (seeded) prompt tokens are prefilled, a couple of
   untimed decode steps warm up, then N decode steps are timed one by one.
   ms/step is the median step; tokens/s is B / median. Per step, the roofline
   counts (:mod:`analysis.cost_model`, from the model's dimensions)
     bytes = weights read once (the tied embedding / lm_head matrix once, plus
             the B embedding rows looked up) + KV read (B * ctx * KV bytes/token)
     FLOPs = 2 * (the layers' projection matrices + lm_head) * B
             + attention 4 * B * ctx * layers * heads * head_dim
   where ctx is the mean number of keys each sequence attends to over the
   timed steps. Reported: the roofline time max(bytes/bw, FLOPs/rate), which
   bound applies, and the achieved fraction of the roofline, of the bandwidth
   roofline alone and of the compute roofline alone.
3. **Prefill** of 512-token prompts, batch 1 and 4, each batch in one engine
   step (``max_tokens=1``, so the step that prefills also finishes them). The
   median of a few repetitions is timed. FLOPs = 2 * the layers' projection
   matrices * tokens + 2 * lm_head params * prompts (the engine, like
   ``generate()``, computes logits only for each prompt's last row) + causal
   attention 4 * n(n+1)/2 * layers * heads * head_dim per prompt; bytes =
   weights + KV written.
4. **Mixed workload.** ``random.Random(seed)`` draws prompt lengths uniform in
   [32, 512] and output lengths uniform in [16, 256] for N requests.
   (a) The engine takes them all at once (``ignore_eos``, ``max_running`` = B)
   and runs to completion. (b) The baseline is ``transformers``
   ``generate()`` (greedy, ``inference_mode``) over static batches of the same
   B, left-padded, generating the batch's longest output for every member
   (``min_new_tokens`` = ``max_new_tokens``). Useful tokens are each request's
   own output length for both, so the baseline's tokens past a request's own
   length count as waste, which is what continuous batching removes.

Targets (printed as met / not met): decode at batch 1 reaches >= 60% of its
bandwidth roofline, decode at batch 64 >= 40% of its compute roofline, and the
mixed workload runs >= 3x the throughput of ``generate()``.

Contention: every measurement records ``other_cpu_cores``, the cores' worth
of CPU other processes used meanwhile (``/proc/stat`` minus this process's
own time). With torch's OpenMP threads on every core, a busy neighbour can
stretch a step 10-100x, so the report warns about any figure taken with more
than ``CONTENTION_WARN_CORES`` busy elsewhere; ``--wait-quiet`` waits (up to a
limit) for a quiet machine before each measurement. Absolute numbers on a
shared CPU are noisy; compare figures from one run.

This module runs the measurements; the rooflines, targets and the text
report are :mod:`benchmarks.engine_report`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from analysis.cost_model import ModelDims
from analysis.machine_peaks import COPY_BYTES, MATMUL_N
from analysis.machine_peaks import measure_matmul_flops
from analysis.machine_peaks import measure_peaks as measure_machine_peaks
from benchmarks.engine_report import (COMPUTE_PEAK_KEYS, CONTENTION_WARN_CORES, DECODE_PROMPT_LEN, PREFILL_LEN,
                                      TARGET_MIXED_RATIO, finish_roofline, mark_decode_targets, render)
from engine.format_cost import FormatCost
from engine.kv_cache_manager import blocks_needed
from engine.llm_engine import LLMEngine, RequestOutput, run_to_completion
from engine.model_loader import DEFAULT_MODEL, LoadedModel, load_model
from engine.sampling_params import SamplingParams

BLOCK_SIZE = 16

DECODE_BATCHES = (1, 8, 32, 64)
DECODE_WARMUP_STEPS = 2
PREFILL_BATCHES = (1, 4)

MIXED_SEED = 0
MIXED_PROMPT_LENS = (32, 512)
MIXED_OUTPUT_LENS = (16, 256)


@dataclass(frozen=True)
class Settings:
    """How much work one run does (``--quick`` shrinks it)."""

    decode_steps: int
    prefill_reps: int
    mixed_requests: int
    mixed_batch: int
    peak_reps: int
    quiet_wait_s: float = 0.0  # before each measurement, wait up to this long for other processes to go quiet
    formats: tuple[str, ...] = ()  # weight formats measured after float32 (labels of FORMATS)
    mixed: bool = True  # run the mixed workload (and its generate() baseline)
    compile: bool = False  # decode-only steps through the compiled decode layer (engine.compiled_decode)


# The weight formats measured after the float32 reference: (dtype, quantization) by label.
FORMATS = {"bfloat16": ("bfloat16", "none"), "int8/bfloat16": ("bfloat16", "int8"),
           "int4/bfloat16": ("bfloat16", "int4"), "int8/float32": ("float32", "int8"),
           "w8a8/bfloat16": ("bfloat16", "w8a8")}
DEFAULT_FORMATS = ("bfloat16", "int8/bfloat16", "int4/bfloat16", "w8a8/bfloat16")
FORMAT_DECODE_BATCHES = (1, 8, 64)

FULL = Settings(decode_steps=16, prefill_reps=3, mixed_requests=64, mixed_batch=32, peak_reps=5,
                formats=DEFAULT_FORMATS)
QUICK = Settings(decode_steps=8, prefill_reps=2, mixed_requests=16, mixed_batch=8, peak_reps=3,
                 formats=DEFAULT_FORMATS)


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ contention
def busy_cpu_seconds() -> float | None:
    """CPU time all processes have used so far (Linux ``/proc/stat``), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Contention:
    """Measures how many cores' worth of CPU *other* processes used during a ``with`` block.

    On a shared machine another process's threads fight torch's OpenMP
    threads and can slow a step many-fold; a figure taken while ``cores`` is
    well above zero is not trustworthy. ``cores`` is None where ``/proc/stat``
    is unavailable.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    def __enter__(self) -> "Contention":
        self._t0, self._busy0, self._own0 = time.perf_counter(), busy_cpu_seconds(), _own_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = busy_cpu_seconds()
        if busy is None or self._busy0 is None:
            return
        others = (busy - self._busy0) - (_own_cpu_seconds() - self._own0)
        self.cores = max(0.0, others) / max(time.perf_counter() - self._t0, 1e-9)


def wait_for_quiet(max_wait_s: float, probe_s: float = 2.0) -> float:
    """Wait up to ``max_wait_s`` until other processes use under ``CONTENTION_WARN_CORES``; return seconds waited."""
    t0 = time.perf_counter()
    if max_wait_s <= 0:
        return 0.0
    while time.perf_counter() - t0 < max_wait_s:
        with Contention() as busy:
            time.sleep(probe_s)
        if busy.cores is None or busy.cores < CONTENTION_WARN_CORES:
            break
    waited = time.perf_counter() - t0
    if waited > 1.5 * probe_s:  # more than the one probe
        log(f"waited {waited:.0f} s for other processes to go quiet")
    return waited


# --------------------------------------------------------------- machine peaks
def measure_peaks(reps: int, quiet_wait_s: float = 0.0) -> dict[str, float | None]:
    """Copy bandwidth and matmul FLOP/s now, with the other processes' CPU use meanwhile."""
    wait_for_quiet(quiet_wait_s)
    with Contention() as busy:
        peaks = measure_machine_peaks(reps=reps, copy_bytes=COPY_BYTES, matmul_n=MATMUL_N)
        bf16_flops = measure_matmul_flops(MATMUL_N, reps, "bfloat16")
    return {"bandwidth_gbps": peaks.bandwidth_bytes_per_s / 1e9, "matmul_gflops": peaks.flops_per_s / 1e9,
            "matmul_bf16_gflops": bf16_flops / 1e9, "other_cpu_cores": busy.cores}


# ------------------------------------------------------------------ model cost
@dataclass(frozen=True)
class ModelCost:
    """The loaded model's dimensions and the bytes its format actually reads.

    FLOPs and KV bytes from :mod:`analysis.cost_model`; the weight bytes are the engine's own
    :class:`engine.format_cost.FormatCost` (every projection and the LM head as held, with scales;
    norms in the activation dtype; a tied quantized head read by the path its row count picks), the
    same count the workers' step accounting uses. Embedding rows and KV are read at ``itemsize`` (the
    format's dtype, also the KV cache's). For float32 this is exactly the cost model's own count (checked).
    """

    dims: ModelDims
    itemsize: int               # bytes per activation / embedding / KV element
    fmt_cost: FormatCost
    label: str = "float32"

    @property
    def weight_bytes(self) -> float:
        """Weights one batch-1 decode step reads."""
        return self.fmt_cost.held_weight_bytes(1)

    @classmethod
    def of(cls, loaded: LoadedModel) -> "ModelCost":
        """Read the dims and bytes off ``loaded``; refuse if the formulas disagree with the real model."""
        dims = ModelDims.from_hf_config(loaded.config)
        w = loaded.weights
        itemsize = w.embed.element_size()
        if dims.kv_bytes_per_token(itemsize) != loaded.kv_layout.bytes_per_token:
            raise RuntimeError(f"cost model's KV bytes/token {dims.kv_bytes_per_token(itemsize)} != engine's "
                               f"{loaded.kv_layout.bytes_per_token}")
        fmt_cost = FormatCost(dims, w)
        if loaded.fmt.quantization == "none":
            # A mismatch means the model is not the Llama shape the cost model counts: its rooflines would be wrong.
            expected, held = dims.weight_bytes_read(0, itemsize), fmt_cost.held_weight_bytes(1)
            if abs(held - expected) > 1:
                raise RuntimeError(f"cost model counts {expected} weight bytes, the engine holds {held}")
        return cls(dims, itemsize, fmt_cost, loaded.fmt.label)

    def decode_step(self, batch: int, ctx: float) -> tuple[float, float]:
        """(bytes, FLOPs) of one decode step of ``batch`` sequences attending to ``ctx`` keys each."""
        return self.fmt_cost.decode_step(batch, ctx, self.itemsize)

    def prefill(self, prompt_lens: list[int]) -> tuple[float, float]:
        """(bytes, FLOPs) of prefilling ``prompt_lens`` in one step, logits for each last row only."""
        return self.fmt_cost.prefill(prompt_lens, self.itemsize)

    def as_dict(self) -> dict[str, Any]:
        d = self.dims
        return {
            "format": self.label,
            "num_params": d.param_count(),
            "non_embedding_params": d.non_embedding_params(),
            "lm_head_params": d.lm_head_params(),
            "param_bytes": d.param_bytes(self.itemsize),
            "weight_bytes_read": self.weight_bytes,
            "num_layers": d.num_layers,
            "num_heads": d.num_heads,
            "head_dim": d.head_dim,
            "kv_bytes_per_token": d.kv_bytes_per_token(self.itemsize),
        }


# -------------------------------------------------------------------- helpers
def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(length)]


def make_engine(loaded: LoadedModel, max_running: int, max_tokens_per_seq: int, max_batched_tokens: int,
                compile: bool = False) -> LLMEngine:
    """An engine whose KV cache holds ``max_running`` sequences of ``max_tokens_per_seq`` tokens."""
    num_blocks = max_running * blocks_needed(max_tokens_per_seq, BLOCK_SIZE) + 1
    return LLMEngine(loaded, block_size=BLOCK_SIZE, num_blocks=num_blocks, max_running=max_running,
                     max_batched_tokens=max(max_batched_tokens, 2048), compile=compile)


def watched(quiet_wait_s: float, fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``fn(*args, **kwargs)``, after waiting up to ``quiet_wait_s`` for a quiet machine.

    Unless ``fn`` measured it over its timed part itself, the other processes'
    CPU use during the whole call is added as ``other_cpu_cores``.
    """
    wait_for_quiet(quiet_wait_s)
    with Contention() as busy:
        result = fn(*args, **kwargs)
    result.setdefault("other_cpu_cores", busy.cores)
    return result


def settle() -> None:
    """Collect garbage between sections, so one section's KV cache is gone before the next allocates."""
    gc.collect()


# --------------------------------------------------------------------- decode
def bench_decode(loaded: LoadedModel, cost: ModelCost, batch: int, steps: int, seed: int,
                 compile: bool = False) -> dict[str, Any]:
    """Time ``steps`` decode steps of ``batch`` sequences after a 256-token prefill (``compile``: through the
    compiled decode layer; its compilation falls in the untimed warm-up steps and is reported)."""
    rng = random.Random(seed)
    max_tokens = 1 + DECODE_WARMUP_STEPS + steps
    engine = make_engine(loaded, batch, DECODE_PROMPT_LEN + max_tokens, batch * DECODE_PROMPT_LEN, compile)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", params=params,
                           prompt_token_ids=random_prompt(rng, DECODE_PROMPT_LEN, loaded.config.vocab_size))
    lengths: dict[str, int] = {}  # prompt + output tokens: the keys the next decode step attends to

    def step() -> list[RequestOutput]:
        outs = engine.step()
        for o in outs:
            lengths[o.request_id] = o.num_prompt_tokens + o.num_output_tokens
        return outs

    t0 = time.perf_counter()
    while len(lengths) < batch:  # prefill: every request has its first token
        step()
    prefill_s = time.perf_counter() - t0
    for _ in range(DECODE_WARMUP_STEPS):
        step()

    times, ctxs = [], []
    with Contention() as busy:
        for _ in range(steps):
            ctxs.append(sum(lengths.values()) / batch)
            t0 = time.perf_counter()
            outs = step()
            times.append(time.perf_counter() - t0)
            if len(outs) != batch:
                raise RuntimeError(f"decode step at batch {batch} produced {len(outs)} tokens")
    if engine.has_unfinished():
        raise RuntimeError("decode requests did not finish when expected")

    step_s = statistics.median(times)
    ctx = statistics.fmean(ctxs)
    log(f"  batch {batch}: {1e3 * step_s:.1f} ms/step, {batch / step_s:.1f} tok/s "
        f"(others {busy.cores if busy.cores is None else round(busy.cores, 2)} cores)")
    nbytes, flops = cost.decode_step(batch, ctx)
    return {
        "batch": batch,
        "context": ctx,
        "steps": steps,
        "ms_per_step": 1e3 * step_s,
        "ms_per_step_mean": 1e3 * statistics.fmean(times),
        "ms_per_step_min": 1e3 * min(times),
        "ms_per_step_max": 1e3 * max(times),
        "tokens_per_s": batch / step_s,
        "prefill_s": prefill_s,
        "compiled": engine.runner.compiled is not None,
        # Seconds of the first call of each compiled graph this engine used (compilation + one run).
        "compile_s": dict(engine.runner.compiled.compile_seconds) if engine.runner.compiled else None,
        "other_cpu_cores": busy.cores,
        "_cost": (nbytes, flops, step_s),
    }


# -------------------------------------------------------------------- prefill
def bench_prefill(loaded: LoadedModel, cost: ModelCost, batch: int, reps: int, seed: int) -> dict[str, Any]:
    """Median time of one engine step that prefills ``batch`` prompts of 512 tokens."""
    rng = random.Random(seed)
    engine = make_engine(loaded, batch, PREFILL_LEN + 1, batch * PREFILL_LEN)
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    times = []
    for rep in range(reps + 1):  # rep 0 warms up
        for i in range(batch):
            engine.add_request(f"p{batch}-{rep}-{i}", params=params,
                               prompt_token_ids=random_prompt(rng, PREFILL_LEN, loaded.config.vocab_size))
        t0 = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - t0
        if len(outs) != batch or engine.has_unfinished():
            raise RuntimeError(f"prefill of {batch} x {PREFILL_LEN} tokens did not fit one step")
        if rep:
            times.append(elapsed)

    step_s = statistics.median(times)
    log(f"  prefill {batch} x {PREFILL_LEN}: {1e3 * step_s:.0f} ms, {batch * PREFILL_LEN / step_s:.0f} tok/s")
    nbytes, flops = cost.prefill([PREFILL_LEN] * batch)
    return {
        "batch": batch,
        "prompt_len": PREFILL_LEN,
        "reps": reps,
        "ms": 1e3 * step_s,
        "ms_min": 1e3 * min(times),
        "tokens_per_s": batch * PREFILL_LEN / step_s,
        "_cost": (nbytes, flops, step_s),
    }


# ---------------------------------------------------------------------- mixed
@dataclass(frozen=True)
class MixedRequest:
    prompt_token_ids: list[int]
    output_len: int


def mixed_requests(n: int, seed: int, vocab_size: int) -> list[MixedRequest]:
    """``n`` requests with prompt and output lengths drawn uniformly by ``random.Random(seed)``."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen = rng.randint(*MIXED_PROMPT_LENS)
        olen = rng.randint(*MIXED_OUTPUT_LENS)
        reqs.append(MixedRequest(random_prompt(rng, plen, vocab_size), olen))
    return reqs


def run_engine_mixed(loaded: LoadedModel, reqs: list[MixedRequest], batch: int,
                     compile: bool = False) -> dict[str, Any]:
    """All requests at once into an engine with ``max_running = batch``; wall time to the last token."""
    longest = max(len(r.prompt_token_ids) + r.output_len for r in reqs)
    engine = make_engine(loaded, batch, longest, 2048, compile)
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        engine.add_request(f"m{i}", params=SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                           prompt_token_ids=r.prompt_token_ids)
    done = run_to_completion(engine)
    wall = time.perf_counter() - t0
    for i, r in enumerate(reqs):
        got = len(done[f"m{i}"].token_ids)
        if got != r.output_len:
            raise RuntimeError(f"engine request m{i} produced {got} tokens, expected {r.output_len}")
    useful = sum(r.output_len for r in reqs)
    stats = engine.stats()
    result = {"wall_s": wall, "useful_tokens": useful, "tokens_per_s": useful / wall,
              "steps": engine.num_steps, "preemptions": stats["preemptions"], "num_blocks": stats["num_blocks"]}
    return result


@torch.inference_mode()
def run_generate_mixed(loaded: LoadedModel, reqs: list[MixedRequest], batch: int) -> dict[str, Any]:
    """``generate()`` over static, left-padded batches of ``batch`` requests, in arrival order."""
    model = loaded.model
    pad = loaded.eos_token_ids[0]
    generated = 0
    t0 = time.perf_counter()
    for start in range(0, len(reqs), batch):
        group = reqs[start:start + batch]
        width = max(len(r.prompt_token_ids) for r in group)
        new_tokens = max(r.output_len for r in group)
        input_ids = torch.full((len(group), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, r in enumerate(group):
            n = len(r.prompt_token_ids)
            input_ids[row, width - n:] = torch.tensor(r.prompt_token_ids)
            attention_mask[row, width - n:] = 1
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        if out.shape != (len(group), width + new_tokens):
            raise RuntimeError(f"generate() returned {tuple(out.shape)}, expected {(len(group), width + new_tokens)}")
        generated += len(group) * new_tokens
    wall = time.perf_counter() - t0
    useful = sum(r.output_len for r in reqs)
    return {"wall_s": wall, "useful_tokens": useful, "generated_tokens": generated,
            "wasted_fraction": 1 - useful / generated, "tokens_per_s": useful / wall}


def bench_mixed(loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
    """The same seeded requests through the engine, then through ``generate()``; their throughput ratio."""
    reqs = mixed_requests(settings.mixed_requests, MIXED_SEED, loaded.config.vocab_size)
    batch = settings.mixed_batch
    log(f"mixed: engine, {len(reqs)} requests, max_running={batch}")
    engine = watched(settings.quiet_wait_s, run_engine_mixed, loaded, reqs, batch, settings.compile)
    settle()
    log(f"mixed: generate(), static batches of {batch}")
    generate = watched(settings.quiet_wait_s, run_generate_mixed, loaded, reqs, batch)
    ratio = engine["tokens_per_s"] / generate["tokens_per_s"]
    return {
        "n_requests": len(reqs),
        "batch_size": batch,
        "seed": MIXED_SEED,
        "prompt_len_range": list(MIXED_PROMPT_LENS),
        "output_len_range": list(MIXED_OUTPUT_LENS),
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in reqs),
        "engine": engine,
        "generate": generate,
        "ratio": ratio,
        "target_ratio": TARGET_MIXED_RATIO,
        "meets_target": ratio >= TARGET_MIXED_RATIO,
    }


# -------------------------------------------------------------------- formats
def bench_format(label: str, settings: Settings, reference_mixed: dict[str, Any] | None) -> dict[str, Any]:
    """Decode, prefill and (when the float32 run had one) the mixed workload, engine side, in one weight format."""
    dtype, quantization = FORMATS[label]
    log(f"{label}: loading")
    loaded = load_model(DEFAULT_MODEL, dtype=dtype, quantization=quantization)
    cost = ModelCost.of(loaded)
    decode = []
    for batch in FORMAT_DECODE_BATCHES:
        log(f"{label}: decode batch {batch}")
        decode.append(watched(settings.quiet_wait_s, bench_decode, loaded, cost, batch, settings.decode_steps,
                              seed=batch, compile=settings.compile))
        settle()
    log(f"{label}: prefill batch 1 x {PREFILL_LEN}")
    prefill = [watched(settings.quiet_wait_s, bench_prefill, loaded, cost, 1, settings.prefill_reps, seed=1001)]
    settle()
    mixed, ratio = None, None
    if reference_mixed is not None:
        reqs = mixed_requests(settings.mixed_requests, MIXED_SEED, loaded.config.vocab_size)
        log(f"{label}: mixed workload, engine")
        mixed = watched(settings.quiet_wait_s, run_engine_mixed, loaded, reqs, settings.mixed_batch,
                        settings.compile)
        ratio = mixed["tokens_per_s"] / reference_mixed["generate"]["tokens_per_s"]
    return {"format": label, "model": cost.as_dict(), "decode": decode, "prefill": prefill, "mixed_engine": mixed,
            "mixed_ratio_vs_generate": ratio, "meets_mixed_target": None if ratio is None else ratio >= TARGET_MIXED_RATIO}


_RSS_SCRIPT = """
import gc, sys
from engine.model_loader import DEFAULT_MODEL, load_model
m = load_model(DEFAULT_MODEL, dtype=sys.argv[1], quantization=sys.argv[2])
gc.collect()
rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1]
print(int(rss) * 1024)
"""


def resident_memory(dtype: str, quantization: str) -> float | None:
    """Resident MB of a fresh process that loaded the model in this format (what a worker holds before its
    KV cache; the interpreter, torch and transformers included). None where /proc is unavailable."""
    import subprocess

    try:
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, dtype, quantization], capture_output=True,
                             text=True, timeout=300, check=True)
        mb = int(out.stdout.strip().splitlines()[-1]) / 1e6
        log(f"  resident memory {dtype}/{quantization}: {mb:.0f} MB")
        return mb
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as e:
        log(f"resident memory of {dtype}/{quantization}: not measured ({e})")
        return None


# ------------------------------------------------------------------------ main
def run(settings: Settings) -> dict[str, Any]:
    load_before = os.getloadavg()
    with Contention() as busy:
        result = run_sections(settings)
    result["machine"]["other_cpu_cores"] = busy.cores
    # The 1/5/15-minute load averages (runnable threads, ours included) before and after: how busy the machine was.
    result["machine"]["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    return result


def run_sections(settings: Settings) -> dict[str, Any]:
    log(f"measuring machine peaks ({settings.peak_reps} reps)")
    start_peaks = measure_peaks(settings.peak_reps, settings.quiet_wait_s)
    log(f"peaks: {start_peaks}")
    log(f"loading {DEFAULT_MODEL}")
    loaded = load_model(DEFAULT_MODEL)
    cost = ModelCost.of(loaded)

    decode = []
    for batch in DECODE_BATCHES:
        log(f"decode: batch {batch}")
        decode.append(watched(settings.quiet_wait_s, bench_decode, loaded, cost, batch, settings.decode_steps,
                              seed=batch, compile=settings.compile))
        settle()
    prefill = []
    for batch in PREFILL_BATCHES:
        log(f"prefill: batch {batch} x {PREFILL_LEN}")
        prefill.append(watched(settings.quiet_wait_s, bench_prefill, loaded, cost, batch, settings.prefill_reps,
                               seed=1000 + batch))
        settle()
    mixed = bench_mixed(loaded, settings) if settings.mixed else None
    del loaded
    settle()
    formats = [bench_format(label, settings, mixed) for label in settings.formats]
    log("resident memory per format (one fresh process each)")
    memory = {label: resident_memory(*FORMATS.get(label, ("float32", "none")))
              for label in ("float32", *settings.formats)}

    log("measuring machine peaks again")
    end_peaks = measure_peaks(settings.peak_reps, settings.quiet_wait_s)
    peaks = {k: max(start_peaks[k], end_peaks[k]) for k in ("bandwidth_gbps", *COMPUTE_PEAK_KEYS.values())}
    finish_roofline(decode, peaks)
    finish_roofline(prefill, peaks)
    mark_decode_targets(decode)
    for f in formats:  # compute against the peak of the format's activation dtype
        finish_roofline(f["decode"], peaks, FORMATS[f["format"]][0])
        finish_roofline(f["prefill"], peaks, FORMATS[f["format"]][0])
        mark_decode_targets(f["decode"])
    machine = {
        **peaks,
        "samples": [start_peaks, end_peaks],
        "copy_bytes": COPY_BYTES,
        "matmul_n": MATMUL_N,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "model": {"name": DEFAULT_MODEL, "dtype": "float32", **cost.as_dict()},
        "settings": asdict(settings),
    }
    return {"machine": machine, "decode": decode, "prefill": prefill, "mixed": mixed, "formats": formats,
            "resident_mb": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer decode steps and a {QUICK.mixed_requests}-request mixed workload")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help=f"comma-separated weight formats measured after float32, of {', '.join(FORMATS)}; "
                             "empty: float32 only")
    parser.add_argument("--skip-mixed", action="store_true",
                        help="skip the mixed workload and its generate() baseline (the slowest section)")
    parser.add_argument("--wait-quiet", metavar="SECONDS", type=float, default=0.0,
                        help="before each measurement, wait up to SECONDS for other processes to stop using "
                             f"the CPUs (more than {CONTENTION_WARN_CORES} cores); default 0: do not wait")
    parser.add_argument("--compile", action="store_true",
                        help="run decode-only steps through the compiled decode layer (pools.decode.compile)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    formats = tuple(f for f in args.formats.split(",") if f)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown format(s) {unknown}; known: {', '.join(FORMATS)}")
    settings = replace(QUICK if args.quick else FULL, quiet_wait_s=args.wait_quiet, formats=formats,
                       mixed=not args.skip_mixed, compile=args.compile)
    result = run(settings)
    log(f"done in {time.perf_counter() - started:.0f} s")
    print(render(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
