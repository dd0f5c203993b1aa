"""Bottleneck report: which resource bounds prefill and decode for a model on a machine.

Run from the repository root::

    python -m analysis.bottleneck [--model NAME] [--hardware H100|H200|A100|local] [--dtype bf16]
                              [--input-len 512] [--output-len 128] [--batch 64] [--rate R] [--json]

Sizing by bottleneck, as a tool: find which resource (compute, memory
bandwidth, memory capacity) bounds each phase for this workload, then size
the prefill and decode pools for it (see docs/architecture.md). All figures
are rooflines from :mod:`analysis.cost_model` (lower bounds on time; real
kernels reach a fraction of them) on the peaks of :mod:`analysis.hardware`.

What it reports:

* weight bytes at fp32 / bf16 / fp8 / int4; KV bytes per token; the KV cache
  at the workload's batch x (input + output) and at Pope et al. 2022's example
  point, batch 512 x context 2048; whether weights + KV fit the worker's memory;
* FLOPs per token, and for one prefill step and one decode step: bytes,
  FLOPs, arithmetic intensity (FLOPs / byte) against the machine's ridge point
  (peak FLOP/s / peak bytes/s): above the ridge a phase is compute-bound,
  below it bandwidth-bound;
* the time to move one request's prompt KV over NVLink, PCIe, 400 and
  100 Gb/s networks (and TCP loopback, measured, with ``--hardware local`` or
  ``--measure-loopback``);
* a prefill:decode worker ratio. With P prompts per prefill step (the
  ``--prefill-tokens`` budget over ``--input-len``), O output tokens and a
  decode batch B::

      T_p = t(prefill step of P prompts) / P          worker-seconds of prefill per request
      T_d = t(decode step at batch B) * (O - 1) / B   worker-seconds of decode per request
                                                       (the first token comes from prefill)

  At a steady R requests/s the prefill pool is busy R * T_p workers' worth and
  the decode pool R * T_d, so prefill:decode = T_p : T_d, shown as the
  smallest integers (terms up to 8) within 10% of it; with ``--rate`` also the
  worker counts ceil(R * T_p) and ceil(R * T_d).

A worker is one device, or with ``--devices N`` (default: the fewest devices,
a power of two, whose memory holds the weights and the batch's KV) a
tensor-parallel group of N with N times the peaks; communication inside the
group is ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from analysis.cost_model import ModelDims, arithmetic_intensity, dtype_bytes, roofline_seconds
from analysis.hardware import LINKS, PROFILES, HardwareProfile, Link, local_profile, measure_tcp_loopback
from analysis.machine_peaks import MachinePeaks
from analysis.model_catalog import (BUILTINS, DEFAULT_MODEL, SUPPORTED_MODEL_TYPES, TINY_LLAMA_CONFIG,
                                    TINY_LLAMA_VOCAB_SIZE, TINY_MODEL, smollm2_gguf_path)

# Real published dims, so large-model figures can be reproduced without any weights.
PRESETS: dict[str, tuple[ModelDims, str]] = {
    "llama-3.1-8b": (ModelDims(32, 4096, 14336, 32, 8, 128, 128256), "Meta Llama 3.1 8B config.json"),
    "llama-3.1-70b": (ModelDims(80, 8192, 28672, 64, 8, 128, 128256), "Meta Llama 3.1 70B config.json"),
    "llama-3.1-405b": (ModelDims(126, 16384, 53248, 128, 8, 128, 128256), "Meta Llama 3.1 405B config.json"),
    # PaLM 540B (Chowdhery et al. 2022, table 1): 118 layers, d_model 18432, 48 heads of 256, SwiGLU
    # d_ff = 4 d_model, 256k vocab, shared input/output embedding, multi-query attention (1 KV head).
    "palm-540b": (ModelDims(118, 18432, 73728, 48, 1, 256, 256000, tie_word_embeddings=True),
                  "PaLM 540B (multi-query attention)"),
    # Pope et al. 2022's "500B+ model with batch 512 and context 2048 -> 3 TB of KV" is PaLM 540B
    # with multi-head attention instead: every one of the 48 heads keeps its own K and V.
    "palm-540b-mha": (ModelDims(118, 18432, 73728, 48, 48, 256, 256000, tie_word_embeddings=True),
                      "PaLM 540B dims with multi-head attention (Pope et al. 2022's KV example)"),
}
REPORT_DTYPES = ("fp32", "bf16", "fp8", "int4")
REFERENCE_BATCH, REFERENCE_CONTEXT = 512, 2048       # Pope et al. 2022's KV cache example
RATIO_MAX_TERM, RATIO_TOLERANCE = 8, 0.10


# ---------------------------------------------------------------- model dims
def load_dims(model: str) -> tuple[ModelDims, str]:
    """Dims of ``model`` (a preset, a ``builtin:`` name, or a HF config.json / model directory) and a source line.

    No weights are loaded: ``builtin:tiny-llama``'s shape is in
    :mod:`analysis.model_catalog`, and SmolLM2's config is read from its GGUF
    header, as the engine's loader does.
    """
    if model in PRESETS:
        return PRESETS[model]
    if model == TINY_MODEL:
        config = SimpleNamespace(**TINY_LLAMA_CONFIG, vocab_size=TINY_LLAMA_VOCAB_SIZE, model_type="llama")
        return ModelDims.from_hf_config(config), "the shape in analysis.model_catalog that engine.tiny_model builds"
    if model == DEFAULT_MODEL:
        from transformers import AutoConfig  # only here: its GGUF reader pulls torch in

        gguf = smollm2_gguf_path()
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return ModelDims.from_hf_config(config), f"GGUF header of {gguf.name}"
    path = Path(model)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise SystemExit(f"--model {model!r}: not a preset ({', '.join(PRESETS)}), not a built-in "
                         f"({', '.join(BUILTINS)}), and no HF config.json at {config_file}")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise SystemExit(f"{config_file}: model_type {raw.get('model_type')!r} is not one of {SUPPORTED_MODEL_TYPES}")
    return ModelDims.from_hf_config(SimpleNamespace(**raw)), str(config_file)


# ------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Workload:
    """Request shape and serving sizes the report is computed for."""

    input_len: int
    output_len: int
    batch: int                    # decode sequences per step on one decode worker
    prefill_tokens: int           # token budget of one prefill step
    rate: float | None = None     # offered requests/s, for worker counts

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.batch < 1 or self.prefill_tokens < 1:
            raise ValueError("input_len, batch and prefill_tokens must be >= 1")
        if self.output_len < 2:
            raise ValueError("output_len must be >= 2: with one output token there is no decode phase")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")

    @property
    def prompts_per_prefill(self) -> int:
        """Prompts one prefill step packs: as many as fit the token budget, at least one."""
        return max(1, self.prefill_tokens // self.input_len)

    @property
    def decode_context(self) -> float:
        """Mean keys a decode step attends to: output token j (2..O) feeds a token with input + j - 1 keys."""
        return self.input_len + self.output_len / 2

    @property
    def context_len(self) -> int:
        """A finished request's length: the KV it holds at its end."""
        return self.input_len + self.output_len


# ------------------------------------------------------------------ formulas
def phase_cost(nbytes: float, flops: float, peaks: MachinePeaks) -> dict[str, Any]:
    """Roofline figures of one step: intensity vs the ridge point decides the bound."""
    seconds, bound = roofline_seconds(nbytes, flops, peaks.bandwidth_bytes_per_s, peaks.flops_per_s)
    return {"bytes": nbytes, "flops": flops, "intensity": arithmetic_intensity(nbytes, flops),
            "ridge_point": peaks.ridge_point, "bound": bound, "seconds": seconds}


def small_ratio(x: float, max_term: int = RATIO_MAX_TERM, tolerance: float = RATIO_TOLERANCE) -> tuple[int, int]:
    """``p:d`` approximating ``x = p / d``: the smallest terms (<= ``max_term``) within ``tolerance``, else the closest.

    ``small_ratio(0.5) == (1, 2)``, ``small_ratio(0.92) == (1, 1)`` (8.7% off),
    ``small_ratio(0.6) == (3, 5)``; beyond the range it clamps: ``small_ratio(20) == (8, 1)``.
    """
    pairs = sorted(((p, d) for p in range(1, max_term + 1) for d in range(1, max_term + 1)), key=lambda pd: sum(pd))
    error = lambda pd: abs(math.log(pd[0] / pd[1] / x))  # noqa: E731 - symmetric: 2x too high = 2x too low
    close = [pd for pd in pairs if error(pd) <= math.log1p(tolerance)]
    return close[0] if close else min(pairs, key=error)


@dataclass(frozen=True)
class PhaseSplit:
    """How one workload's work divides between the pools: worker-seconds per request of each phase.

    At a steady ``R`` requests/s the prefill pool is busy ``R * prefill_s``
    workers' worth and the decode pool ``R * decode_s``, so prefill:decode is
    ``prefill_s : decode_s``. The same arithmetic serves the roofline report
    (step times from the cost model) and the autoscaler (busy seconds a live
    cluster measured, over the requests it finished).
    """

    prefill_s: float  # worker-seconds of prefill per request
    decode_s: float  # worker-seconds of decode per request

    @classmethod
    def measured(cls, prefill_busy_s: float, prefill_requests: int, decode_busy_s: float,
                 decode_requests: int) -> PhaseSplit:
        """From busy seconds and finished requests of each pool over the same window."""
        if prefill_requests < 1 or decode_requests < 1:
            raise ValueError("each pool must have finished at least one request in the window")
        return cls(prefill_busy_s / prefill_requests, decode_busy_s / decode_requests)

    @property
    def exact(self) -> float:
        """prefill:decode as one number, ``prefill_s / decode_s``."""
        return self.prefill_s / self.decode_s

    @property
    def prefill_share(self) -> float:
        """The prefill pool's share of all workers, ``prefill_s / (prefill_s + decode_s)``."""
        return self.prefill_s / (self.prefill_s + self.decode_s)

    def small(self) -> tuple[int, int]:
        """The ratio in small integers (:func:`small_ratio`)."""
        return small_ratio(self.exact)

    def workers(self, rate: float) -> dict[str, int]:
        """Workers each pool needs at ``rate`` requests/s when every worker is fully busy."""
        return {"prefill": math.ceil(rate * self.prefill_s), "decode": math.ceil(rate * self.decode_s)}


def devices_needed(weight_bytes: float, kv_bytes: float, memory_bytes: float) -> int:
    """Fewest devices, a power of two (how tensor parallelism splits heads), whose memory holds weights + KV."""
    n = 1
    while n * memory_bytes < weight_bytes + kv_bytes and n < 1024:
        n *= 2
    return n


def analyze(model: str, dims: ModelDims, hw: HardwareProfile, dtype: str, kv_dtype: str, wl: Workload,
            devices: int | None = None, links: tuple[Link, ...] = LINKS) -> dict[str, Any]:
    """The whole report as a JSON-ready dict (see the module docstring for each figure)."""
    wbytes, kvbytes = dtype_bytes(dtype), dtype_bytes(kv_dtype)
    weights = dims.param_bytes(wbytes)
    kv_token = dims.kv_bytes_per_token(kvbytes)
    kv_batch = dims.kv_cache_bytes(wl.batch, wl.context_len, kvbytes)
    if devices is None:
        devices = 1 if hw.measured else devices_needed(weights, kv_batch, hw.memory_bytes)
    one = hw.peaks(dtype)
    peaks = MachinePeaks(one.bandwidth_bytes_per_s * devices, one.flops_per_s * devices)
    memory = hw.memory_bytes * devices

    prefill = phase_cost(*dims.prefill([wl.input_len] * wl.prompts_per_prefill, wbytes, kvbytes), peaks)
    decode = phase_cost(*dims.decode_step(wl.batch, wl.decode_context, wbytes, kvbytes), peaks)
    split = PhaseSplit(prefill["seconds"] / wl.prompts_per_prefill, decode["seconds"] * (wl.output_len - 1) / wl.batch)
    t_p, t_d = split.prefill_s, split.decode_s
    p, d = split.small()
    ref_kv = {dt: dims.kv_cache_bytes(REFERENCE_BATCH, REFERENCE_CONTEXT, dtype_bytes(dt))
              for dt in ("fp32", "bf16", "fp8")}
    prompt_kv = wl.input_len * kv_token
    return {
        "model": {"name": model, **dims.as_dict()},
        "hardware": {"name": hw.name, "description": hw.description, "source": hw.source, "devices": devices,
                     "memory_bytes": memory, "bandwidth_bytes_per_s": peaks.bandwidth_bytes_per_s,
                     "flops_per_s": peaks.flops_per_s, "compute_dtype": hw.compute_dtype(dtype),
                     "ridge_point": peaks.ridge_point},
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "workload": {**asdict(wl), "prompts_per_prefill": wl.prompts_per_prefill,
                     "decode_context": wl.decode_context},
        "param_bytes": {dt: dims.param_bytes(dtype_bytes(dt)) for dt in REPORT_DTYPES},
        "kv": {
            "bytes_per_token": kv_token,
            "per_request_bytes": wl.context_len * kv_token,
            "batch_bytes": kv_batch,
            "reference": {"batch": REFERENCE_BATCH, "context": REFERENCE_CONTEXT, "bytes": ref_kv,
                          "times_weights": dims.kv_cache_bytes(REFERENCE_BATCH, REFERENCE_CONTEXT, kvbytes) / weights},
        },
        "memory": {"weights_bytes": weights, "kv_bytes": kv_batch, "capacity_bytes": memory,
                   "fits": weights + kv_batch <= memory,
                   "max_batch": max(0, int((memory - weights) // (wl.context_len * kv_token)))},
        "flops_per_token": {"prefill_last_token": dims.flops_per_token(wl.input_len),
                            "decode_mean": dims.flops_per_token(wl.decode_context)},
        "prefill": {**prefill, "prompts": wl.prompts_per_prefill, "seconds_per_request": t_p,
                    "requests_per_s": 1 / t_p, "tokens_per_s": wl.input_len / t_p},
        "decode": {**decode, "batch": wl.batch, "tpot_s": decode["seconds"], "seconds_per_request": t_d,
                   "requests_per_s": 1 / t_d, "tokens_per_s": wl.batch / decode["seconds"]},
        "transfer": {"prompt_kv_bytes": prompt_kv,
                     "links": [{"name": ln.name, "bytes_per_s": ln.bytes_per_s, "note": ln.note,
                                "seconds": prompt_kv / ln.bytes_per_s,
                                "tpot_multiple": prompt_kv / ln.bytes_per_s / decode["seconds"],
                                "max_requests_per_s": ln.bytes_per_s / prompt_kv} for ln in links]},
        "ratio": {"prefill_decode": f"{p}:{d}", "exact": split.exact,
                  "workers": None if wl.rate is None else split.workers(wl.rate)},
    }


# -------------------------------------------------------------------- report
def fmt_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 B), as the spec sheets use."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float, unit: str = "") -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def fmt_num(x: float) -> str:
    """A plain number: thousands separated up to 10^5, SI prefixes beyond."""
    if x >= 1e5:
        return fmt_count(x)
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(r: dict[str, Any]) -> str:
    """The report as readable text."""
    m, hw, wl, kv, mem = r["model"], r["hardware"], r["workload"], r["kv"], r["memory"]
    pre, dec, ratio = r["prefill"], r["decode"], r["ratio"]
    params = " | ".join(f"{dt} {fmt_bytes(b)}" for dt, b in r["param_bytes"].items())
    ref = kv["reference"]
    group = f" x {hw['devices']} (tensor parallel, peaks summed)" if hw["devices"] > 1 else ""
    out = [
        f"Model     {m['name']} ({r['model']['source']})",
        f"          {m['num_layers']} layers, hidden {m['hidden_size']}, MLP {m['intermediate_size']}, "
        f"{m['num_heads']} heads / {m['num_kv_heads']} KV heads x {m['head_dim']}, vocab {m['vocab_size']}"
        + (", tied embeddings" if m["tie_word_embeddings"] else ""),
        f"          {fmt_count(m['param_count'])} parameters: {params}",
        f"Hardware  {hw['name']}: {hw['description']}{group}",
        f"          {fmt_bytes(hw['bandwidth_bytes_per_s'])}/s, {fmt_count(hw['flops_per_s'], 'FLOP/s')} "
        f"({hw['compute_dtype']} matmuls) -> ridge point {hw['ridge_point']:.0f} FLOP/byte",
        f"          source: {hw['source']}",
        f"Workload  input {wl['input_len']}, output {wl['output_len']} tokens; decode batch {wl['batch']}; "
        f"prefill {pre['prompts']} prompt(s) per step; weights {r['dtype']}, KV {r['kv_dtype']}",
        "",
        f"KV cache  {fmt_bytes(kv['bytes_per_token'])}/token; {fmt_bytes(kv['per_request_bytes'])} per request "
        f"({wl['input_len'] + wl['output_len']} tokens); {fmt_bytes(kv['batch_bytes'])} at batch {wl['batch']}",
        f"          at batch {ref['batch']} x context {ref['context']} (Pope et al. 2022's example): "
        + " | ".join(f"{dt} {fmt_bytes(b)}" for dt, b in ref["bytes"].items())
        + f"; at {r['kv_dtype']} that is {fmt_num(ref['times_weights'])}x the {r['dtype']} weights",
        f"Memory    weights {fmt_bytes(mem['weights_bytes'])} + KV {fmt_bytes(mem['kv_bytes'])} of "
        f"{fmt_bytes(mem['capacity_bytes'])}: {'fits' if mem['fits'] else 'DOES NOT FIT'}; "
        f"largest batch at {wl['input_len'] + wl['output_len']} tokens: {mem['max_batch']:,}",
        f"FLOPs     {fmt_count(r['flops_per_token']['prefill_last_token'], 'FLOP')}/token at context "
        f"{wl['input_len']}, {fmt_count(r['flops_per_token']['decode_mean'], 'FLOP')}/token at the decode "
        f"mean context {wl['decode_context']:g}",
        "",
        format_table(
            ["phase", "one step", "bytes", "FLOPs", "FLOP/byte", "bound", "step time", "per request",
             "worker req/s", "worker tok/s"],
            [["prefill", f"{pre['prompts']} x {wl['input_len']} tokens", fmt_bytes(pre["bytes"]),
              fmt_count(pre["flops"]), fmt_num(pre["intensity"]), pre["bound"], fmt_seconds(pre["seconds"]),
              fmt_seconds(pre["seconds_per_request"]), fmt_num(pre["requests_per_s"]), fmt_num(pre["tokens_per_s"])],
             ["decode", f"batch {dec['batch']} @ ctx {wl['decode_context']:g}", fmt_bytes(dec["bytes"]),
              fmt_count(dec["flops"]), fmt_num(dec["intensity"]), dec["bound"], fmt_seconds(dec["seconds"]),
              fmt_seconds(dec["seconds_per_request"]), fmt_num(dec["requests_per_s"]), fmt_num(dec["tokens_per_s"])]],
        ),
        f"(ridge point {hw['ridge_point']:.0f} FLOP/byte: a step above it is compute-bound, below it "
        "bandwidth-bound; 'per request' is worker time per request, the step shared by its prompts / batch)",
        "",
        f"KV transfer of one prompt ({wl['input_len']} tokens, {fmt_bytes(r['transfer']['prompt_kv_bytes'])})",
        format_table(
            ["link", "GB/s", "time", "x TPOT", "link req/s", "note"],
            [[ln["name"], f"{ln['bytes_per_s'] / 1e9:.3g}", fmt_seconds(ln["seconds"]), f"{ln['tpot_multiple']:.2g}",
              fmt_num(ln["max_requests_per_s"]), ln["note"]] for ln in r["transfer"]["links"]],
        ),
        "",
        f"Suggested prefill:decode = {ratio['prefill_decode']}  (worker time per request: prefill "
        f"{fmt_seconds(pre['seconds_per_request'])} : decode {fmt_seconds(dec['seconds_per_request'])} "
        f"= {ratio['exact']:.3g})",
    ]
    if ratio["workers"]:
        out.append(f"  at {wl['rate']:g} requests/s: {ratio['workers']['prefill']} prefill and "
                   f"{ratio['workers']['decode']} decode worker(s), on the rooflines (real kernels need more)")
    return "\n".join(out)


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.bottleneck", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"models: {', '.join(BUILTINS)}, presets {', '.join(PRESETS)}, or a HF config.json / model dir\n"
               f"hardware: {', '.join(PROFILES)}, local (measured now)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (see below)")
    parser.add_argument("--hardware", default="H100", choices=[*PROFILES, "local"])
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "fp8", "int4"],
                        help="weight dtype (default bf16; fp32 for local, what the engine runs on CPUs)")
    parser.add_argument("--kv-dtype", choices=["fp32", "bf16", "fp16", "fp8"],
                        help="KV cache dtype (default: the weight dtype; bf16 for int4 weights)")
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (>= 2)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per decode step on one decode worker")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="token budget of one prefill step")
    parser.add_argument("--rate", type=float, help="offered requests/s: also print worker counts")
    parser.add_argument("--devices", type=int, help="devices per worker (tensor parallel); default: fewest that fit")
    parser.add_argument("--measure-loopback", action="store_true",
                        help="also measure one TCP stream over 127.0.0.1 (on by default with --hardware local)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local = args.hardware == "local"
    dtype = args.dtype or ("fp32" if local else "bf16")
    kv_dtype = args.kv_dtype or ("bf16" if dtype == "int4" else dtype)
    try:
        wl = Workload(args.input_len, args.output_len, args.batch, args.prefill_tokens, args.rate)
    except ValueError as e:
        raise SystemExit(f"python -m analysis.bottleneck: {e}") from None
    if args.devices is not None and args.devices < 1:
        raise SystemExit("python -m analysis.bottleneck: --devices must be >= 1")
    dims, source = load_dims(args.model)
    if local:
        from analysis.machine_peaks import measure_peaks

        hw = local_profile(measure_peaks())
    else:
        hw = PROFILES[args.hardware]
    links = LINKS
    if local or args.measure_loopback:
        links = (*LINKS, Link("TCP loopback", measure_tcp_loopback(), "one stream over 127.0.0.1, measured now"))
    report = analyze(args.model, dims, hw, dtype, kv_dtype, wl, devices=args.devices, links=links)
    report["model"]["source"] = source
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
