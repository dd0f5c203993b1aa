"""Report of ``benchmarks.engine``: rooflines of the measured steps, targets, contention warning, tables.

Kept apart from the runner (which loads the model and times the engine) so
that each module has one job: this one turns measured seconds, bytes and
FLOPs into roofline fractions and the text report, without torch. The
workload shape the report prints and the targets are constants here
because both sides need them.
"""

from __future__ import annotations

from typing import Any

from analysis.cost_model import roofline_seconds
from analysis.machine_peaks import peak_dtype

DECODE_PROMPT_LEN = 256
PREFILL_LEN = 512

TARGET_DECODE_B1_BANDWIDTH = 0.70   # decode batch 1: fraction of its bandwidth roofline (bytes its format reads)
TARGET_DECODE_B64_COMPUTE = 0.50    # decode batch 64: fraction of its compute roofline
TARGET_MIXED_RATIO = 3.0            # engine / generate() useful tokens per second

CONTENTION_WARN_CORES = 0.25  # other processes' CPU use (in cores) above which a figure is flagged


# The machine-peak key of each peak dtype's matmul FLOP/s; which peak bounds a compute dtype is
# analysis.machine_peaks.peak_dtype's to say (the workers' MFU uses the same mapping).
COMPUTE_PEAK_KEYS = {"float32": "matmul_gflops", "bfloat16": "matmul_bf16_gflops"}


def roofline(nbytes: float, flops: float, seconds: float, peaks: dict[str, float],
             dtype: str = "float32") -> dict[str, Any]:
    """Roofline time of (bytes, FLOPs) on ``peaks`` (compute: the ``dtype`` matmul peak) and the fraction
    ``seconds`` achieves."""
    flops_per_s = peaks[COMPUTE_PEAK_KEYS[peak_dtype(dtype)]] * 1e9
    bw_s = nbytes / (peaks["bandwidth_gbps"] * 1e9)
    compute_s = flops / flops_per_s
    roof_s, bound = roofline_seconds(nbytes, flops, peaks["bandwidth_gbps"] * 1e9, flops_per_s)
    return {
        "bytes": nbytes,
        "flops": flops,
        "roofline_ms": 1e3 * roof_s,
        "bound": bound,
        "fraction_of_roofline": roof_s / seconds,
        "fraction_of_bandwidth_roofline": bw_s / seconds,
        "fraction_of_compute_roofline": compute_s / seconds,
        "achieved_gbps": nbytes / seconds / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
        "compute_dtype": dtype,
    }


def finish_roofline(entries: list[dict[str, Any]], peaks: dict[str, float], dtype: str = "float32") -> None:
    """Replace each entry's raw ``_cost`` by its roofline figures against ``peaks`` (compute: ``dtype``'s)."""
    for e in entries:
        nbytes, flops, seconds = e.pop("_cost")
        e.update(roofline(nbytes, flops, seconds, peaks, dtype))


def mark_decode_targets(decode: list[dict[str, Any]]) -> None:
    for e in decode:
        if e["batch"] == 1:
            e["target"] = {"metric": "fraction_of_bandwidth_roofline", "threshold": TARGET_DECODE_B1_BANDWIDTH}
        elif e["batch"] == 64:
            e["target"] = {"metric": "fraction_of_compute_roofline", "threshold": TARGET_DECODE_B64_COMPUTE}
        else:
            continue
        e["target"]["met"] = e[e["target"]["metric"]] >= e["target"]["threshold"]


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cores(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def contention_warning(result: dict[str, Any]) -> str | None:
    """A warning line when other processes used a noticeable share of the CPUs during any measurement."""
    m = result["machine"]
    figures = [s["other_cpu_cores"] for s in m["samples"]]
    figures += [e["other_cpu_cores"] for e in result["decode"] + result["prefill"]]
    if result["mixed"] is not None:
        figures += [result["mixed"]["engine"]["other_cpu_cores"], result["mixed"]["generate"]["other_cpu_cores"]]
    for f in result.get("formats", []):
        figures += [e["other_cpu_cores"] for e in f["decode"] + f["prefill"]]
        figures += [f["mixed_engine"]["other_cpu_cores"]] if f["mixed_engine"] else []
    worst = max((f for f in figures if f is not None), default=None)
    if worst is None or worst < CONTENTION_WARN_CORES:
        return None
    return (f"WARNING: other processes used up to {worst:.2f} of {m['cpu_count']} cores during a measurement "
            "(column 'others'); those figures are contended and not trustworthy.")


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def target_note(e: dict[str, Any]) -> str:
    t = e.get("target")
    if t is None:
        return ""
    kind = "bw" if "bandwidth" in t["metric"] else "compute"
    return f"{kind} >= {pct(t['threshold'])}: {'met' if t['met'] else 'NOT met'}"


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    mdl = m["model"]
    out = [
        f"Machine: {m['cpu_count']} CPUs, torch {m['torch_version']} with {m['torch_threads']} threads",
        f"  copy bandwidth {m['bandwidth_gbps']:.1f} GB/s (start {m['samples'][0]['bandwidth_gbps']:.1f}, "
        f"end {m['samples'][1]['bandwidth_gbps']:.1f}); "
        f"fp32 matmul {m['matmul_gflops']:.1f} GFLOP/s (start {m['samples'][0]['matmul_gflops']:.1f}, "
        f"end {m['samples'][1]['matmul_gflops']:.1f})"
        + (f"; bf16 matmul {m['matmul_bf16_gflops']:.1f} GFLOP/s" if "matmul_bf16_gflops" in m else ""),
        f"  other processes' CPU use: {cores(m['other_cpu_cores'])} cores over the run, "
        f"{cores(m['samples'][0]['other_cpu_cores'])} / {cores(m['samples'][1]['other_cpu_cores'])} "
        "during the start / end peak measurements"
        + (f"; load average {m['load_average']['before'][0]:.2f} before, {m['load_average']['after'][0]:.2f} after"
           if m.get("load_average") else ""),
        f"Model: {mdl['name']}, {mdl['num_params'] / 1e6:.1f}M params ({mdl['param_bytes'] / 1e6:.0f} MB), "
        f"KV {mdl['kv_bytes_per_token']} B/token",
        "",
        f"Decode (prompt {DECODE_PROMPT_LEN} tokens; median of timed steps)",
        format_table(
            ["batch", "ctx", "ms/step", "tok/s", "roofline ms", "bound", "of roofline", "of bw", "of compute",
             "GB/s", "GFLOP/s", "others", "target"],
            [[str(e["batch"]), f"{e['context']:.0f}", f"{e['ms_per_step']:.1f}", f"{e['tokens_per_s']:.1f}",
              f"{e['roofline_ms']:.1f}", e["bound"], pct(e["fraction_of_roofline"]),
              pct(e["fraction_of_bandwidth_roofline"]), pct(e["fraction_of_compute_roofline"]),
              f"{e['achieved_gbps']:.1f}", f"{e['achieved_gflops']:.1f}", cores(e["other_cpu_cores"]),
              target_note(e)]
             for e in result["decode"]],
        ),
        "",
        f"Prefill ({PREFILL_LEN}-token prompts, one step; median of reps)",
        format_table(
            ["batch", "tokens", "ms", "tok/s", "roofline ms", "bound", "of roofline", "of bw", "of compute",
             "GFLOP/s", "others"],
            [[str(e["batch"]), str(e["batch"] * e["prompt_len"]), f"{e['ms']:.0f}", f"{e['tokens_per_s']:.0f}",
              f"{e['roofline_ms']:.0f}", e["bound"], pct(e["fraction_of_roofline"]),
              pct(e["fraction_of_bandwidth_roofline"]), pct(e["fraction_of_compute_roofline"]),
              f"{e['achieved_gflops']:.1f}", cores(e["other_cpu_cores"])]
             for e in result["prefill"]],
        ),
    ]
    out += render_mixed(result["mixed"])
    out += render_formats(result)
    out += render_compile(result)
    warning = contention_warning(result)
    if warning:
        out += ["", warning]
    return "\n".join(out)


def render_compile(result: dict[str, Any]) -> list[str]:
    """The compiled decode's first-call seconds per format and batch (nothing when it was off)."""
    runs = [("float32", result["decode"])] + [(f["format"], f["decode"]) for f in result.get("formats") or []]
    lines = [f"  {label} batch {e['batch']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in e["compile_s"].items())
             for label, decode in runs for e in decode if e.get("compile_s")]
    if not lines:
        return []
    return ["", "Compiled decode (--compile): first call of each graph (compilation + one run; the disk cache "
                "makes later processes faster)"] + lines


def render_mixed(mx: dict[str, Any] | None) -> list[str]:
    if mx is None:
        return ["", "Mixed workload: not run (--skip-mixed)"]
    eng, gen = mx["engine"], mx["generate"]
    return [
        "",
        f"Mixed workload: {mx['n_requests']} requests, seed {mx['seed']}, prompts {mx['prompt_len_range']}, "
        f"outputs {mx['output_len_range']}, batch {mx['batch_size']}",
        format_table(
            ["system", "wall s", "useful tok", "tok/s", "others", "notes"],
            [["engine", f"{eng['wall_s']:.1f}", str(eng["useful_tokens"]), f"{eng['tokens_per_s']:.1f}",
              cores(eng["other_cpu_cores"]), f"{eng['steps']} steps, {eng['preemptions']} preemptions"],
             ["generate()", f"{gen['wall_s']:.1f}", str(gen["useful_tokens"]), f"{gen['tokens_per_s']:.1f}",
              cores(gen["other_cpu_cores"]), f"{gen['generated_tokens']} generated, {pct(gen['wasted_fraction'])} wasted"]],
        ),
        f"  engine / generate() = {mx['ratio']:.2f}x (target >= {mx['target_ratio']:.0f}x: "
        f"{'met' if mx['meets_target'] else 'NOT met'})",
    ]


def _format_row(label: str, decode: list[dict[str, Any]], prefill: list[dict[str, Any]], weight_bytes: float,
                mixed_tps: float | None, ratio: float | None, rss: float | None) -> list[str]:
    by_batch = {e["batch"]: e for e in decode}
    b1, b8, b64 = by_batch.get(1), by_batch.get(8), by_batch.get(64)
    return [label, f"{weight_bytes / 1e6:.0f}", "n/a" if rss is None else f"{rss:.0f}",
            f"{b1['ms_per_step']:.1f}" if b1 else "-", pct(b1["fraction_of_bandwidth_roofline"]) if b1 else "-",
            f"{b8['tokens_per_s']:.0f}" if b8 else "-", f"{b64['tokens_per_s']:.0f}" if b64 else "-",
            pct(b64["fraction_of_compute_roofline"]) if b64 else "-",
            f"{prefill[0]['tokens_per_s']:.0f}" if prefill else "-",
            pct(prefill[0]["fraction_of_compute_roofline"]) if prefill else "-",
            "-" if mixed_tps is None else f"{mixed_tps:.1f}", "-" if ratio is None else f"{ratio:.2f}x"]


def render_formats(result: dict[str, Any]) -> list[str]:
    """One row per weight format: the bytes it reads, memory, decode and prefill speed, mixed workload."""
    formats = result.get("formats")
    if not formats:
        return []
    rss = result.get("resident_mb", {})
    mx = result["mixed"]
    rows = [_format_row("float32", result["decode"], [e for e in result["prefill"] if e["batch"] == 1],
                        result["machine"]["model"].get("weight_bytes_read", result["machine"]["model"]["param_bytes"]),
                        mx and mx["engine"]["tokens_per_s"], mx and mx["ratio"], rss.get("float32"))]
    rows += [_format_row(f["format"], f["decode"], f["prefill"], f["model"]["weight_bytes_read"],
                         f["mixed_engine"] and f["mixed_engine"]["tokens_per_s"], f["mixed_ratio_vs_generate"],
                         rss.get(f["format"]))
             for f in formats]
    return [
        "",
        "Weight formats (decode prompt 256 tokens; roofline fractions for the bytes each format reads; "
        "compute against the matmul peak of the format's activation dtype, float32 or bfloat16; "
        "mixed workload vs float32 generate())",
        format_table(["format", "weights MB", "RSS MB", "b1 ms/tok", "b1 of bw", "b8 tok/s", "b64 tok/s",
                      "b64 of compute", "prefill tok/s", "prefill of compute", "mixed tok/s", "vs generate"], rows),
        f"  targets: batch 1 >= {pct(TARGET_DECODE_B1_BANDWIDTH)} of bandwidth, batch 64 >= "
        f"{pct(TARGET_DECODE_B64_COMPUTE)} of compute, mixed >= {TARGET_MIXED_RATIO:.0f}x generate(); "
        "RSS: a fresh process after loading the model (interpreter and libraries included)",
    ]
