"""What the OpenAI-compatible HTTP path adds to TTFT and TPOT over gRPC, on one deployment.

    python -m benchmarks.http_overhead [--model builtin:smollm2-135m-instruct] [--concurrency 8]
        [--rounds 6] [--requests 16] [--output-tokens 32] [--json PATH]

One process starts one local deployment (``benchmarks.deployments.make_config``:
1 prefill + 1 decode worker, KV over gloo, the router here with
``router.http_port`` on) and drives the same seeded ``short`` workload
(exact input lengths, ``max_tokens`` = ``--output-tokens`` with ``ignore_eos``,
greedy) through ``benchmarks.loadgen.run_trace`` at a fixed concurrency, once
over gRPC (``router.client.AsyncClient``) and once over HTTP
(``benchmarks.http_client.OpenAIStreamClient``: SSE from ``/v1/completions``),
alternating which goes first each round, so both see the same machine load.
TTFT and TPOT are the client-side figures of docs/architecture.md
(Measurement). Reported: the medians per API over all rounds, and the
median over rounds of each round's paired difference (HTTP - gRPC TTFT in ms,
HTTP / gRPC TPOT - 1 in %), with the CPU other processes used meanwhile.
On a small shared machine those end-to-end differences are dominated by the
engine's noise, so the front door's own cost is also reported: per request,
the client's TTFT (TPOT) minus the router's own ``timings.ttft_ms``
(``tpot_ms``), whose median difference between HTTP and gRPC is what the HTTP
path adds (request parsing, JSON and SSE framing, the client's parsing).
Targets: at most +2 ms TTFT and +3 % TPOT at 8 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from analysis.model_catalog import DEFAULT_MODEL
from benchmarks.common import CpuSampler, log, start_ray
from benchmarks.deployments import make_config, running
from benchmarks.http_client import OpenAIStreamClient
from benchmarks.loadgen import FixedConcurrency, run_trace, warm_up
from benchmarks.workloads import WorkloadSpec, generate
from router.client import AsyncClient

APIS = ("grpc", "http")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


async def measure(address: str, http_url: str, requests, concurrency: int, rounds: int) -> dict:
    clients = {"grpc": AsyncClient(address, 600.0), "http": OpenAIStreamClient(http_url, 600.0)}
    per_round: list[dict] = []
    try:
        for api in APIS:
            await warm_up(clients[api], requests, 2)
        for r in range(rounds):
            order = APIS if r % 2 == 0 else APIS[::-1]
            row: dict = {"order": list(order)}
            for api in order:
                records = await run_trace(None, requests, FixedConcurrency(concurrency), client=clients[api],
                                          request_id_prefix=f"{api}-{r}-{time.time_ns()}")
                bad = [rec.error_kind for rec in records if not rec.ok]
                if bad:
                    raise RuntimeError(f"{api} round {r}: {len(bad)} requests failed: {bad[:3]}")
                row[api] = {"ttft_ms": [rec.ttft_s * 1e3 for rec in records],
                            "tpot_ms": [rec.tpot_s * 1e3 for rec in records if rec.tpot_s is not None],
                            # What the front door adds, per request: the client's figure minus the
                            # router's own (its timings), so the engine's noise cancels out.
                            "ttft_door_ms": [rec.ttft_s * 1e3 - rec.server["ttft_ms"] for rec in records],
                            "tpot_door_ms": [rec.tpot_s * 1e3 - rec.server["tpot_ms"] for rec in records
                                             if rec.tpot_s is not None]}
            per_round.append(row)
            log(f"round {r + 1}/{rounds}: TTFT grpc {_median(row['grpc']['ttft_ms']):.1f} / http "
                f"{_median(row['http']['ttft_ms']):.1f} ms; TPOT grpc {_median(row['grpc']['tpot_ms']):.2f} / http "
                f"{_median(row['http']['tpot_ms']):.2f} ms")
    finally:
        for c in clients.values():
            await c.close()
    result: dict = {"rounds": per_round}
    for api in APIS:
        result[api] = {k: _median([x for row in per_round for x in row[api][k]])
                       for k in ("ttft_ms", "tpot_ms", "ttft_door_ms", "tpot_door_ms")}
    g, h = result["grpc"], result["http"]
    result["door"] = {"ttft_ms": h["ttft_door_ms"] - g["ttft_door_ms"],
                      "tpot_pct": 100 * (h["tpot_door_ms"] - g["tpot_door_ms"]) / g["tpot_ms"]}
    ttft_diffs = [_median(row["http"]["ttft_ms"]) - _median(row["grpc"]["ttft_ms"]) for row in per_round]
    tpot_ratios = [_median(row["http"]["tpot_ms"]) / _median(row["grpc"]["tpot_ms"]) - 1 for row in per_round]
    result["added"] = {"ttft_ms": _median(ttft_diffs), "tpot_pct": 100 * _median(tpot_ratios),
                       "ttft_ms_per_round": ttft_diffs, "tpot_pct_per_round": [100 * x for x in tpot_ratios]}
    return result


def render(result: dict, args: argparse.Namespace) -> str:
    a, g, h, door = result["added"], result["grpc"], result["http"], result["door"]
    cpu = result.get("cpu", {})
    return "\n".join([
        f"HTTP vs gRPC on one deployment ({args.model}, 1 prefill + 1 decode, gloo), {args.requests} requests x "
        f"{args.rounds} rounds per API at concurrency {args.concurrency}, {args.output_tokens} output tokens; "
        f"other processes used {cpu.get('other_cores')} cores (load average up to {cpu.get('loadavg_1m')}).",
        "",
        "| API | TTFT p50 ms | TPOT p50 ms | client - router TTFT p50 ms | client - router TPOT p50 ms |",
        "|---|---|---|---|---|",
        f"| gRPC | {g['ttft_ms']:.2f} | {g['tpot_ms']:.3f} | {g['ttft_door_ms']:.3f} | {g['tpot_door_ms']:.4f} |",
        f"| HTTP (OpenAI SSE) | {h['ttft_ms']:.2f} | {h['tpot_ms']:.3f} | {h['ttft_door_ms']:.3f} | "
        f"{h['tpot_door_ms']:.4f} |",
        "",
        f"Front-door cost added by HTTP (client minus router figures, HTTP minus gRPC; engine noise cancels): "
        f"TTFT **{door['ttft_ms']:+.3f} ms** (target <= 2), TPOT **{door['tpot_pct']:+.3f} %** (target <= 3).",
        "",
        f"End to end (median of per-round paired differences, engine noise included): TTFT {a['ttft_ms']:+.2f} ms, "
        f"TPOT {a['tpot_pct']:+.2f} %. Per round: TTFT "
        + ", ".join(f"{x:+.1f}" for x in a["ttft_ms_per_round"]) + " ms; TPOT "
        + ", ".join(f"{x:+.1f}" for x in a["tpot_pct_per_round"]) + " %.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=16, help="requests per API per round")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from engine.model_loader import load_tokenizer

    n_out = args.output_tokens
    requests = generate(WorkloadSpec(name="short", num_requests=args.requests, seed=args.seed,
                                     short_output=(n_out, n_out)), load_tokenizer(args.model))
    import ray

    start_ray("http-overhead")
    try:
        cfg = make_config(model=args.model, decode={"max_running": 64}, router={"max_queued": 1024})
        with running(cfg) as (d, address), CpuSampler() as cpu:
            t0 = time.perf_counter()
            result = asyncio.run(measure(address, d.deployment.http_url, requests, args.concurrency, args.rounds))
            result["cpu"] = cpu.window(t0, time.perf_counter())
    finally:
        ray.shutdown()
    result["config"] = vars(args)
    print(render(result, args), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
