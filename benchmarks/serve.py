"""Serving load generator: replay a seeded workload against a running
splitserve router over gRPC (or, with ``--api http``, its OpenAI-compatible
HTTP API) at one or more rates and report TTFT, TPOT, ITL, E2E, throughput,
SLO attainment and DistServe goodput.

    python -m benchmarks.serve --address 127.0.0.1:50051 --workload short --rates 0.5,1,2
    python -m benchmarks.serve --workload mixed --arrival poisson --rates 1,2,4 \\
        --ttft-slo-ms 1000 --tpot-slo-ms 150 --json out.json --markdown out.md --plots figs/
    python -m benchmarks.serve --arrival concurrency --concurrency 1,4,16 --workload multi-turn
    python -m benchmarks.serve --api http --http-url http://127.0.0.1:8000/v1 --arrival concurrency --concurrency 8

See benchmarks/serve.md for the workloads, the arrival processes, the
definitions and the output files. Progress goes to stderr, the summary table
to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import grpc

from benchmarks.loadgen import (APIS, Arrival, Burst, ConstantRate, FixedConcurrency, Poisson, RunResult,
                                make_client, run_sweep)
from benchmarks.slo import ATTAINMENT_TARGET, SLO, Goodput, goodput
from benchmarks.workloads import WORKLOADS, WorkloadSpec, describe, generate, range_arg

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_HTTP_URL = "http://127.0.0.1:8000/v1"
ARRIVALS = ("poisson", "constant", "burst", "concurrency")


def _floats(text: str) -> list[float]:
    vals = [float(x) for x in text.split(",") if x.strip()]
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive numbers, got {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    vals = [int(x) for x in text.split(",") if x.strip()]
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers >= 1, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    """The command line (public so that other benchmark commands can extend it)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("target")
    g.add_argument("--address", default=DEFAULT_ADDRESS, help="router host:port (default %(default)s)")
    g.add_argument("--api", choices=APIS, default="grpc",
                   help="grpc: the Serving API at --address; http: the OpenAI-compatible API at --http-url")
    g.add_argument("--http-url", default=DEFAULT_HTTP_URL,
                   help="the OpenAI API's base URL, with --api http (default %(default)s)")
    g.add_argument("--tls-ca", default=None, help="CA certificate (PEM) for a TLS router")
    g.add_argument("--token-file", default=None, help="file holding the bearer token for the router")
    g.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each request (default %(default)s)")
    g.add_argument("--model", default="auto",
                   help="tokenizer to build exact-length prompts with: a model name as engine.model_loader takes it, "
                        "or 'auto' (default) for the model the router serves")
    w = ap.add_argument_group("workload (lengths in tokens, LOW:HIGH drawn uniformly, or one number)")
    w.add_argument("--workload", choices=WORKLOADS, default="short")
    w.add_argument("--num-requests", type=int, default=32, help="requests per run (default %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="seeds the workload and Poisson arrivals")
    d = WorkloadSpec()
    w.add_argument("--short-input", type=range_arg, default=d.short_input)
    w.add_argument("--short-output", type=range_arg, default=d.short_output)
    w.add_argument("--long-input", type=range_arg, default=d.long_input)
    w.add_argument("--long-output", type=range_arg, default=d.long_output)
    w.add_argument("--long-fraction", type=float, default=d.long_fraction, help="mixed: share of long requests")
    w.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens, help="shared-prefix: common prefix length")
    w.add_argument("--suffix-input", type=range_arg, default=d.suffix_input, help="shared-prefix: distinct suffix")
    w.add_argument("--turns", type=int, default=d.turns, help="multi-turn: turns per conversation")
    w.add_argument("--turn-input", type=range_arg, default=d.turn_input, help="multi-turn: tokens each turn adds")
    w.add_argument("--turn-output", type=range_arg, default=d.turn_output, help="multi-turn: answer length")
    w.add_argument("--interleave", type=int, default=d.interleave,
                   help="multi-turn: conversations interleaved turn by turn (default %(default)s)")
    w.add_argument("--replay-answers", action="store_true",
                   help="multi-turn: put the served answers in the history (input lengths no longer exact)")
    w.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: server's, greedy)")
    a = ap.add_argument_group("arrivals")
    a.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    a.add_argument("--rates", type=_floats, default=None,
                   help="comma-separated request rates (req/s) to sweep: poisson, constant, burst (default 1)")
    a.add_argument("--burst-size", type=int, default=None,
                   help="burst: requests per burst (default: all at once, one burst)")
    a.add_argument("--burst-interval", type=float, default=None, help="burst: seconds between bursts (without --rates)")
    a.add_argument("--concurrency", type=_ints, default=None, help="concurrency: comma-separated in-flight counts")
    a.add_argument("--warmup", type=int, default=1, help="unrecorded requests sent one by one first (default 1)")
    s = ap.add_argument_group("SLOs")
    s.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    s.add_argument("--tpot-slo-ms", type=float, default=200.0)
    s.add_argument("--attainment-target", type=float, default=ATTAINMENT_TARGET,
                   help="goodput: the share of requests that must meet both SLOs (default %(default)s)")
    o = ap.add_argument_group("output")
    o.add_argument("--json", default=None, help="write config, workload, every record, summaries, goodput")
    o.add_argument("--markdown", default=None, help="write the summary table")
    o.add_argument("--plots", default=None, help="directory for latency_cdf.png and attainment.png")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def target(args: argparse.Namespace) -> str:
    """Where the requests go: the gRPC address, or with ``--api http`` the OpenAI API's base URL."""
    return args.http_url if args.api == "http" else args.address


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    """The :class:`WorkloadSpec` the parsed flags describe."""
    return WorkloadSpec(name=args.workload, num_requests=args.num_requests, seed=args.seed,
                        short_input=args.short_input, short_output=args.short_output, long_input=args.long_input,
                        long_output=args.long_output, long_fraction=args.long_fraction,
                        prefix_tokens=args.prefix_tokens, suffix_input=args.suffix_input, turns=args.turns,
                        turn_input=args.turn_input, turn_output=args.turn_output, interleave=args.interleave)


def arrivals_from_args(args: argparse.Namespace) -> list[Arrival]:
    """One arrival per run of the sweep, from the flags."""
    if args.arrival == "concurrency":
        if args.rates:
            raise ValueError("--arrival concurrency sweeps --concurrency, not --rates")
        return [FixedConcurrency(c) for c in (args.concurrency or [1])]
    if args.concurrency:
        raise ValueError("--concurrency needs --arrival concurrency")
    if args.arrival == "burst":
        if args.burst_size is None:
            if args.rates or args.burst_interval:
                raise ValueError("--rates/--burst-interval need --burst-size")
            return [Burst()]
        if args.rates:
            return [Burst.at_rate(args.burst_size, r) for r in args.rates]
        if args.burst_interval:
            return [Burst(args.burst_size, args.burst_interval)]
        raise ValueError("bursts of --burst-size need --rates or --burst-interval")
    rates = args.rates or [1.0]
    if args.arrival == "poisson":
        return [Poisson(r, seed=args.seed) for r in rates]
    return [ConstantRate(r) for r in rates]


def load_tokenizer_for(args: argparse.Namespace, token: str | None):
    """The tokenizer named by ``--model``; ``auto`` asks the router which model it serves."""
    from engine.model_loader import load_tokenizer  # imports torch: only when prompts are built here

    name = args.model
    if name == "auto":
        async def ask() -> str:
            client = make_client(target(args), 30.0, args.tls_ca, token, args.api)
            try:
                return (await client.status()).model
            finally:
                await client.close()

        name = asyncio.run(ask())
    return name, load_tokenizer(name)


def _clean(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists, dataclasses -> dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def build_report(config: dict, workload: dict, slo: SLO, runs: list[RunResult], good: Goodput, xlabel: str) -> dict:
    """The ``--json`` object: ``config``, ``workload``, ``slo``, ``runs`` (each with
    ``records``), ``goodput``, ``environment``."""
    return _clean({
        "config": config,
        "workload": workload,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "attainment_target": good.target},
        "runs": [r.to_dict() for r in runs],
        "goodput": {**dataclasses.asdict(good), "x": xlabel},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": os.cpu_count(), "time": datetime.datetime.now().isoformat(timespec="seconds")},
    })


def _f(x, fmt: str = ".0f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def render_markdown(report: dict) -> str:
    """A summary table (one row per run) with the goodput, from a :func:`build_report` object."""
    slo, wl, g = report["slo"], report["workload"], report["goodput"]
    lines = [
        f"Workload `{wl.get('name', '?')}`: {wl['num_requests']} requests per run, input "
        f"{wl['input_tokens']['min']}-{wl['input_tokens']['max']} tokens (mean {wl['input_tokens']['mean']:.0f}), "
        f"output {wl['output_tokens']['min']}-{wl['output_tokens']['max']}; "
        f"SLOs TTFT ≤ {_f(slo['ttft_ms'], 'g')} ms, TPOT ≤ {_f(slo['tpot_ms'], 'g')} ms.",
        "",
        "| run | ok/n | errors | req/s | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | "
        "ITL p50/p90/p99/max ms | E2E p50/p99 ms | attain (both/TTFT/TPOT) | server queue/prefill/transfer ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        s = run["summary"]
        t, p, i, e, a, sv = s["ttft_ms"], s["tpot_ms"], s["itl_ms"], s["e2e_ms"], s["attainment"], s["server_mean"]
        errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "-"
        lines.append(
            f"| {run['label']} | {s['num_ok']}/{s['num_requests']} | {errors} | {_f(s['request_throughput'], '.2f')} | "
            f"{_f(s['output_token_throughput'], '.1f')} | {_f(t['p50'])}/{_f(t['p90'])}/{_f(t['p99'])} | "
            f"{_f(p['p50'], '.1f')}/{_f(p['p90'], '.1f')}/{_f(p['p99'], '.1f')} | "
            f"{_f(i['p50'], '.1f')}/{_f(i['p90'], '.1f')}/{_f(i['p99'], '.1f')}/{_f(i['max'], '.1f')} | "
            f"{_f(e['p50'])}/{_f(e['p99'])} | {_f(a['both'], '.0%')}/{_f(a['ttft'], '.0%')}/{_f(a['tpot'], '.0%')} | "
            f"{_f(sv['queue_ms'], '.1f')}/{_f(sv['prefill_ms'], '.1f')}/{_f(sv['transfer_ms'], '.1f')} |")
    flag = " (lower bound)" if g["lower_bound"] else ""
    lines += ["", f"Goodput ({g['x']}, ≥ {g['target']:.0%} meeting both SLOs): **{g['rate']:.3g}**{flag}. "
                  f"{g['note'][:1].upper() + g['note'][1:]}{'; attainment is not monotone in the rate' if g['non_monotone'] else ''}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        arrivals = arrivals_from_args(args)
        spec = workload_spec(args)
    except ValueError as e:
        ap.error(str(e))
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    try:
        model, tokenizer = load_tokenizer_for(args, token)
    except grpc.RpcError as e:
        print(f"error: cannot ask the router at {args.address} for its model ({e.code().name}: {e.details()}); "
              f"is it running? (or pass --model)", file=sys.stderr)
        return 1
    requests = generate(spec, tokenizer)
    slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
    closed = args.arrival == "concurrency" or arrivals[0].rate is None
    xlabel = "achieved request rate (req/s)" if closed else "offered rate (req/s)"
    bars = []

    def progress(k: int, arrival: Arrival):
        if args.no_progress:
            return None
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=f"[{k + 1}/{len(arrivals)}] {arrival.describe()['kind']} "
                   f"{arrival.rate or getattr(arrival, 'concurrency', '')}", file=sys.stderr, unit="req",
                   dynamic_ncols=True)
        bars.append(bar)
        counts = {"ok": 0, "err": 0}

        def on_done(rec) -> None:
            counts["ok" if rec.ok else "err"] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

        return on_done

    runs = asyncio.run(run_sweep(target(args), requests, arrivals, slo, timeout_s=args.timeout_s, tls_ca=args.tls_ca,
                                 token=token, temperature=args.temperature, replay_answers=args.replay_answers,
                                 warmup=args.warmup, api=args.api, progress=progress))
    for bar in bars:
        bar.close()
    good = goodput([(r.x, r.summary["attainment"]["both"]) for r in runs], args.attainment_target)
    config = {k: v for k, v in vars(args).items()}
    config["model"] = model
    report = build_report(config, {"name": spec.name, **dataclasses.asdict(spec), **describe(requests)}, slo, runs,
                          good, xlabel)
    table = render_markdown(report)
    print(table, end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    if args.plots:
        from benchmarks.plots import plot_all

        plot_all([(r.label, r.x, r.records, r.summary["attainment"]) for r in runs], slo, good, args.plots, xlabel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
