"""Prompt caching end to end: ``benchmarks.serve``'s ``shared-prefix`` and
``multi-turn`` workloads against the same disaggregated deployment with the
prefix cache off and on.

Run from the repository root::

    python -m benchmarks.prefix_cache [--quick] [--workloads shared-prefix,multi-turn] \\
        [--json PATH] [--markdown PATH]

One process, one private local Ray cluster (:func:`benchmarks.common.start_ray`).
Two arms, the same shape and cores (1 prefill + 1 decode worker of
``num_cpus`` 1, KV over gloo, SmolLM2-135M float32), started one after the
other:

- ``off``: ``pools.*.prefix_caching: false``, ``router.policy: least_loaded``,
  no conditional disaggregation: every prompt prefilled whole, its whole KV moved;
- ``on``: prefix caching on both pools, ``router.policy: prefix_aware``, and
  ``router.conditional_prefill_max_tokens`` (default 128): a prompt whose
  part uncached on the chosen decode worker is that short is prefilled there.

Each workload is sent closed loop, one request in flight (TTFT is then the
prefill's cost, not queueing), the same seeded requests on both arms.
Reported per workload and arm: TTFT p50 (all requests; for multi-turn also
turns 2-5), its reduction from ``off``, the mean KV bytes moved per request
and the bytes the cache saved (``off``'s mean minus ``on``'s; the router's
per-request ``transfer_bytes_saved`` counts only the partial transfers), the
requests that took the decode-only path, and each pool's prefix-cache hit
rate over the run (the workers' ``prefix_hit_tokens / prefix_queried_tokens``
deltas from ClusterStatus).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.model_catalog import DEFAULT_MODEL
from benchmarks.loadgen import FixedConcurrency, run_sweep
from benchmarks.slo import SLO, RequestRecord
from benchmarks.workloads import WorkloadSpec, generate

ARMS = ("off", "on")
WORKLOADS = ("shared-prefix", "multi-turn")
MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    shared_prefix_requests: int = 8
    prefix_tokens: int = 1000
    conversations: int = 2
    turns: int = 5
    output_tokens: tuple[int, int] = (16, 16)
    conditional_tokens: int = 128
    seed: int = 0


FULL = Settings()
QUICK = Settings(shared_prefix_requests=5, conversations=1)


def arm_config(arm: str, settings: Settings, model: str, namespace: str) -> dict[str, Any]:
    """The deployment dict of one arm (validate with :func:`cluster.config.parse_config`)."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    on = arm == "on"
    router: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": None, "drain_grace_s": 10,
                              "policy": "prefix_aware" if on else "least_loaded"}
    if on:
        router["conditional_prefill_max_tokens"] = settings.conditional_tokens
    return {
        "model": {"name": model, "dtype": "float32", "max_model_len": MAX_MODEL_LEN},
        "pools": {"mode": "disaggregated", "ratio": "1:1", "replicas": 2,
                  "prefill": {"num_cpus": 1, "num_blocks": 512, "max_batched_tokens": MAX_MODEL_LEN,
                              "prefix_caching": on},
                  "decode": {"num_cpus": 1, "num_blocks": 1024, "prefix_caching": on}},
        "kvtransfer": {"backend": "gloo", "timeout_s": 60, "lease_s": 60.0},
        "router": router,
        "ray": {"namespace": f"{namespace}-{arm}"},
    }


def workload(name: str, settings: Settings) -> WorkloadSpec:
    if name == "shared-prefix":
        return WorkloadSpec(name=name, num_requests=settings.shared_prefix_requests, seed=settings.seed,
                            prefix_tokens=settings.prefix_tokens, suffix_input=(16, 48),
                            short_output=settings.output_tokens)
    return WorkloadSpec(name=name, num_requests=settings.conversations * settings.turns, seed=settings.seed,
                        turns=settings.turns, turn_input=(40, 64), turn_output=settings.output_tokens,
                        interleave=settings.conversations)


def cache_counters(address: str) -> dict[str, tuple[int, int]]:
    """Pool kind -> (prefix hit tokens, queried tokens), summed over its workers."""
    from router.client import Client

    client = Client(address)
    try:
        out = {}
        for pool in client.status().pools:
            out[pool.kind] = (sum(w.prefix_hit_tokens for w in pool.workers),
                              sum(w.prefix_queried_tokens for w in pool.workers))
        return out
    finally:
        client.close()


def summarize(records: list[RequestRecord], before: dict[str, tuple[int, int]],
              after: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """One arm's figures for one workload (see the module docstring)."""
    ok = [r for r in records if r.ok]

    def p50(rs: list[RequestRecord]) -> float | None:
        xs = [r.ttft_s * 1000.0 for r in rs if r.ttft_s is not None]
        return statistics.median(xs) if xs else None

    def mean(key: str) -> float | None:
        xs = [r.server[key] for r in ok if key in r.server]
        return sum(xs) / len(xs) if xs else None

    hit_rate = {}
    for kind, (hits, queried) in after.items():
        h0, q0 = before.get(kind, (0, 0))
        hit_rate[kind] = (hits - h0) / (queried - q0) if queried > q0 else None
    later_turns = [r for r in ok if r.turn is not None and r.turn >= 1]
    return {
        "num_ok": len(ok), "num_requests": len(records),
        "ttft_p50_ms": p50(ok),
        "ttft_p50_turns_2_5_ms": p50(later_turns) if later_turns else None,
        "ttft_ms_by_request": [r.ttft_s * 1000.0 if r.ttft_s is not None else None for r in records],
        "transfer_bytes_mean": mean("transfer_bytes"),
        "transfer_bytes_saved_partial_mean": mean("transfer_bytes_saved"),
        "prefill_cached_tokens_mean": mean("prefill_cached_tokens"),
        "decode_cached_tokens_mean": mean("decode_cached_tokens"),
        "paths": {p: sum(1 for r in ok if r.path == p) for p in sorted({r.path for r in ok})},
        "hit_rate": hit_rate,
    }


def reduction(off: float | None, on: float | None) -> float | None:
    """How much lower ``on`` is than ``off`` (0.8 = 80 % lower)."""
    return None if not off or on is None else 1.0 - on / off


def run(settings: Settings, workloads: list[str], model: str = DEFAULT_MODEL) -> dict[str, Any]:
    from benchmarks.common import start_ray
    from benchmarks.deployments import running
    from cluster.config import parse_config
    from engine.model_loader import load_tokenizer

    tokenizer = load_tokenizer(model)
    requests = {w: generate(workload(w, settings), tokenizer) for w in workloads}
    result: dict[str, Any] = {"model": model, "settings": settings.__dict__, "load_before": os.getloadavg(),
                              "workloads": {w: {} for w in workloads}, "configs": {}}
    start_ray("prefix-cache-bench", num_cpus=2)
    try:
        for arm in ARMS:
            cfg = arm_config(arm, settings, model, f"prefix-cache-{os.getpid()}")
            result["configs"][arm] = cfg
            with running(parse_config(cfg, source=f"<arm {arm}>")) as (_, address):
                for w in workloads:
                    log(f"{arm}: {w} ({len(requests[w])} requests, one in flight)")
                    before = cache_counters(address)
                    (res,) = asyncio.run(run_sweep(address, requests[w], [FixedConcurrency(1)],
                                                   SLO(1000.0, 200.0), timeout_s=300.0))
                    result["workloads"][w][arm] = summarize(res.records, before, cache_counters(address))
    finally:
        import ray

        ray.shutdown()
    for w, arms in result["workloads"].items():
        off, on = arms["off"], arms["on"]
        arms["ttft_p50_reduction"] = reduction(off["ttft_p50_ms"], on["ttft_p50_ms"])
        arms["ttft_p50_turns_2_5_reduction"] = reduction(off["ttft_p50_turns_2_5_ms"], on["ttft_p50_turns_2_5_ms"])
        if off["transfer_bytes_mean"] is not None and on["transfer_bytes_mean"] is not None:
            arms["transfer_bytes_saved_mean"] = off["transfer_bytes_mean"] - on["transfer_bytes_mean"]
    result["load_after"] = os.getloadavg()
    return result


def _f(x, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def render_markdown(result: dict[str, Any]) -> str:
    lines = [f"Model `{result['model']}`; load average before {tuple(round(x, 1) for x in result['load_before'])}, "
             f"after {tuple(round(x, 1) for x in result['load_after'])}.", "",
             "| workload | arm | ok/n | TTFT p50 ms | TTFT p50 turns 2-5 ms | KV bytes moved / req | "
             "prefill cached tok / req | decode cached tok / req | paths | hit rate prefill / decode |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w, arms in result["workloads"].items():
        for arm in ARMS:
            s = arms[arm]
            hr = s["hit_rate"]
            paths = ", ".join(f"{k or '?'} {v}" for k, v in s["paths"].items())
            lines.append(
                f"| {w} | {arm} | {s['num_ok']}/{s['num_requests']} | {_f(s['ttft_p50_ms'])} | "
                f"{_f(s['ttft_p50_turns_2_5_ms'])} | {_f(s['transfer_bytes_mean'])} | "
                f"{_f(s['prefill_cached_tokens_mean'])} | {_f(s['decode_cached_tokens_mean'])} | {paths} | "
                f"{_f(hr.get('prefill'), '.0%')} / {_f(hr.get('decode'), '.0%')} |")
    lines.append("")
    for w, arms in result["workloads"].items():
        lines.append(f"- `{w}`: TTFT p50 {_f(arms['ttft_p50_reduction'], '.0%')} lower with the cache"
                     + (f", turns 2-5 {_f(arms['ttft_p50_turns_2_5_reduction'], '.0%')} lower"
                        if arms["ttft_p50_turns_2_5_reduction"] is not None else "")
                     + f"; KV bytes saved per request {_f(arms.get('transfer_bytes_saved_mean'))}.")
    return "\n".join(lines) + "\n"


def log(msg: str) -> None:
    print(f"[prefix_cache] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prefix_cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (5 shared-prefix, 1 conversation)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    if any(w not in WORKLOADS for w in workloads):
        ap.error(f"--workloads: choose from {WORKLOADS}")
    result = run(QUICK if args.quick else FULL, workloads, args.model)
    table = render_markdown(result)
    print(table, end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
