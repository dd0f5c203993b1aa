"""Autoscaled pools against the best static split, on a trace whose rate and prompt mix move.

Run from the repository root::

    python -m benchmarks.autoscale [--quick] [--json PATH] [--plot PATH] [--markdown PATH]

``--plot docs/autoscale.png --json docs/autoscale.json`` regenerates the
committed figure and the figures it is drawn from (records left out).

One process, one local Ray cluster (:func:`benchmarks.common.start_ray`, as
many logical CPUs as ``max_total`` workers of 0.5 CPU take), the arms one
after the other, each a deployment of :func:`benchmarks.deployments.make_config`
with every worker at ``num_cpus`` 0.5 (one torch thread; 4 such workers fill
the 2 cores):

1. ``autoscaled``: ``pools.autoscale`` with ``ratio: auto``, 2-4 workers
   (``--workers MIN:MAX``; with MIN = MAX the total is capped and the ratio
   moves only by switching workers' roles in place), starting at the split
   :func:`start_split` gives MIN, short windows (the trace's phases last 30-40 s);
2. then the static splits with the autoscaled arm's *average* worker count
   (rounded; worker-seconds are compared, so the rounding is accounted for):
   every P:D of that total unless ``--static`` names some; the best of them
   (most SLO-met requests per worker-second) is the comparison.

The trace (:mod:`benchmarks.autoscale_report`): quiet chat, busy chat
(decode bound), busy long documents (prefill bound), quiet mixed. Requests
are exact-length raw prompts (:mod:`benchmarks.workloads`, the model's own
tokenizer) sent by :func:`benchmarks.loadgen.run_trace`; every arm gets the
same requests at the same offsets, after the same unrecorded warm-up.
SmolLM2-135M, not the tiny model: the tiny model's prefill and decode cost
next to nothing, so no split would be better than another and the
comparison would measure only start-up overheads; SmolLM2's ~1-2 s
prefill of a 400-token prompt and ~60-120 ms decode step on one thread make
the prefill:decode balance matter, in a few minutes per arm.

While an arm runs, a sampler thread asks, every ``SAMPLE_S``: Ray for the CPUs
held (held / 0.5 = workers holding resources, those starting and draining
included: the cost), the pool manager for its routing table (live workers,
targets, the autoscaler's report: decisions, the latest start and switch
times). Decisions are the changes in the report's counters between samples.
"""

from __future__ import annotations

from cluster.local_ray import apply_ray_env

# Ray reads its environment when it is imported: token auth and loopback only, set before any import of ray.
apply_ray_env()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from analysis.model_catalog import DEFAULT_MODEL  # noqa: E402
from benchmarks.autoscale_report import (AUTOSCALED, DEFAULT_PHASES, LONG_INPUT, LONG_OUTPUT,  # noqa: E402
                                         MAX_TOTAL, MIN_TOTAL, SHORT_INPUT, SHORT_OUTPUT, SLO_LONG, SLO_SHORT,
                                         WORKER_CPUS, Phase, TraceEvent, analyze_run, arm_goodput, compare, mean_rate,
                                         render_markdown, trace_events, write_plot)
from benchmarks.common import CpuSampler, log  # noqa: E402
from benchmarks.loadgen import Scheduled, run_trace  # noqa: E402
from benchmarks.slo import RequestRecord  # noqa: E402
from benchmarks.workloads import BenchRequest, WorkloadSpec, generate, range_arg  # noqa: E402
from cluster.autoscale_policy import ROLES  # noqa: E402
from worker_common.routing_table import RoutingTable  # noqa: E402

SAMPLE_S = 0.5
REQUEST_TIMEOUT_S = 300.0
NAMESPACE = "bench-autoscale"


@dataclass(frozen=True)
class Settings:
    phases: tuple[Phase, ...] = DEFAULT_PHASES
    scales: tuple[float, ...] = (1.0,)   # the trace's rates times each; >= 2 scales give a goodput interpolation
    static: tuple[str, ...] = ()         # P:D splits to run; () = every split of the autoscaled average total
    static_first: bool = False           # run the static splits before the autoscaled arm (needs ``static``)
    window_s: float = 10.0               # attainment-over-time windows
    seed: int = 0
    autoscale: tuple[tuple[str, Any], ...] = (
        ("ratio", "auto"), ("min_total", MIN_TOTAL), ("max_total", MAX_TOTAL),
        ("ttft_s", 1.5), ("tpot_s", 0.2), ("attainment", 0.9),
        ("prefill_queue_tokens", 800), ("high_load", 0.75), ("low_load", 0.25),
        ("interval_s", 1.0), ("scale_up_window_s", 2.0), ("scale_down_window_s", 8.0), ("cooldown_s", 4.0),
        ("ratio_window_s", 20.0))


def totals(settings: Settings) -> tuple[int, int]:
    """The autoscaled arm's ``(min_total, max_total)``."""
    a = dict(settings.autoscale)
    return int(a["min_total"]), int(a["max_total"])


def start_split(total: int) -> str:
    """The autoscaled arm's first P:D for ``total`` workers: even, or one more decode worker
    (the trace opens with chat, decode-bound)."""
    return f"{total // 2}:{total - total // 2}"


QUICK_PHASES = tuple(replace(p, duration_s=p.duration_s / 2) for p in DEFAULT_PHASES)


def arm_config(arm: str, model: str, settings: Settings):
    """``autoscaled`` or a static ``"P:D"`` split, as a validated ClusterConfig (its own Ray namespace)."""
    from benchmarks.deployments import make_config

    common = dict(model=model, router={"request_timeout_s": REQUEST_TIMEOUT_S, "metrics_port": None,
                                       "http_port": None},
                  kvtransfer={"timeout_s": 120, "lease_s": 120.0},
                  prefill={"num_cpus": WORKER_CPUS, "num_blocks": 256, "max_batched_tokens": 1024},
                  decode={"num_cpus": WORKER_CPUS, "num_blocks": 512, "max_running": 16})
    if arm == AUTOSCALED:
        low = totals(settings)[0]
        cfg = make_config(ratio=start_split(low), replicas=low, autoscale=dict(settings.autoscale), **common)
    else:
        p, d = (int(x) for x in arm.split(":"))
        cfg = make_config(ratio=arm, replicas=p + d, **common)
    return cfg


def table_sample(t: float, table: RoutingTable) -> dict:
    """One sample of the routing table at ``t`` s: the live (prefill, decode) workers and the autoscaler's report
    (kept in this process only: :func:`decisions_and_latencies` reads them)."""
    live = tuple(len(table.of_kind(role)) for role in ROLES)
    return {"t": round(t, 2), "live": live, "autoscale": table.autoscale}


class Sampler(threading.Thread):
    """Every ``SAMPLE_S``: CPUs held (-> workers), the routing table's live workers and autoscale report."""

    def __init__(self, pm: Any, t0: float) -> None:
        super().__init__(daemon=True)
        self.pm, self.t0 = pm, t0
        self.stop_ev = threading.Event()
        self.workers: list[tuple[float, float]] = []
        self.tables: list[dict] = []

    def run(self) -> None:
        import ray

        total = ray.cluster_resources().get("CPU", 0.0)
        while not self.stop_ev.is_set():
            t = time.perf_counter() - self.t0
            try:
                held = total - ray.available_resources().get("CPU", 0.0)
                table = ray.get(self.pm.table.remote(), timeout=10)
            except Exception as e:  # a missed sample is a gap, not a failed benchmark
                log(f"sample failed: {e!r}")
                self.stop_ev.wait(SAMPLE_S)
                continue
            self.workers.append((round(t, 2), round(held / WORKER_CPUS, 2)))
            self.tables.append(table_sample(t, table))
            self.stop_ev.wait(SAMPLE_S)

    def stop(self) -> None:
        self.stop_ev.set()
        self.join(timeout=30)


def decisions_and_latencies(tables: list[dict]) -> tuple[list[dict], dict[str, list[float]]]:
    """The autoscaler's changes (from its counters between samples) and the start/switch latencies."""
    out: list[dict] = []
    lat: dict[str, list[float]] = {"start_s": [], "switch_s": [], "decision_to_serving_s": []}
    prev = None
    for s in tables:
        rep = s["autoscale"]
        if rep is None:
            continue
        counts = dict(rep.decisions)
        if prev is not None:
            before = dict(prev.decisions)
            for action in ("scale_up", "scale_down", "rebalance"):
                if counts.get(action, 0) > before.get(action, 0):
                    out.append({"t": s["t"], "action": action, "targets": list(rep.targets),
                                "reason": rep.last_reason if rep.last_action == action else ""})
            if rep.last_start_s is not None and rep.last_start_s != prev.last_start_s:
                lat["start_s"].append(round(rep.last_start_s, 2))
            if rep.last_switch_s is not None and rep.last_switch_s != prev.last_switch_s:
                lat["switch_s"].append(round(rep.last_switch_s, 2))
        prev = rep
    for d in out:  # when did the live pools first match the decision's target?
        hit = next((s["t"] for s in tables if s["t"] >= d["t"] and tuple(s["live"]) == tuple(d["targets"])), None)
        if hit is not None and d["action"] != "scale_down":  # a drain is instant in the table
            lat["decision_to_serving_s"].append(round(hit - d["t"], 1))
    return out, lat


def make_requests(tokenizer, events, seed: int) -> list[BenchRequest]:
    """Exact-length requests for ``events`` (short / long pools, one per send)."""
    n_short = sum(e.kind == "short" for e in events)
    n_long = sum(e.kind == "long" for e in events)
    spec = dict(short_input=(SHORT_INPUT, SHORT_INPUT), short_output=(SHORT_OUTPUT, SHORT_OUTPUT),
                long_input=LONG_INPUT, long_output=(LONG_OUTPUT, LONG_OUTPUT))
    shorts = iter(generate(WorkloadSpec(name="short", num_requests=max(1, n_short), seed=seed, **spec), tokenizer))
    longs = iter(generate(WorkloadSpec(name="long", num_requests=max(1, n_long), seed=seed + 1, **spec), tokenizer))
    return [replace(next(shorts if e.kind == "short" else longs), index=i) for i, e in enumerate(events)]


def run_arm(arm: str, cfg, requests: list[BenchRequest], times: tuple[float, ...], warm: list[BenchRequest],
            cpu: CpuSampler) -> tuple[list[RequestRecord], Sampler, dict]:
    from benchmarks.deployments import running

    t_up = time.perf_counter()
    with running(cfg) as (d, address):
        log(f"{arm}: up in {time.perf_counter() - t_up:.1f} s; warming up")
        warm_recs = asyncio.run(run_trace(address, warm, Scheduled((0.0,) * len(warm)), timeout_s=REQUEST_TIMEOUT_S,
                                          request_id_prefix=f"warm-{arm}-{time.time_ns()}"))
        if not all(r.ok for r in warm_recs):
            raise RuntimeError(f"{arm}: warm-up failed: {[r.error for r in warm_recs if not r.ok]}")
        time.sleep(3.0)  # let the warm-up's work leave the autoscaler's short windows
        t0 = time.perf_counter()
        sampler = Sampler(d.deployment.pool_manager, t0)
        sampler.start()
        try:
            recs = asyncio.run(run_trace(address, requests, Scheduled(times), timeout_s=REQUEST_TIMEOUT_S,
                                         request_id_prefix=f"{arm}-{time.time_ns()}"))
        finally:
            sampler.stop()
        t1 = time.perf_counter()
    env = cpu.window(t0, t1)
    log(f"{arm}: {sum(r.ok for r in recs)}/{len(recs)} ok in {t1 - t0:.0f} s; "
        f"other processes {env['other_cores']} cores")
    return recs, sampler, env


def run(settings: Settings, model: str = DEFAULT_MODEL) -> tuple[dict, dict[str, dict[str, list[RequestRecord]]]]:
    """Every arm at every scale; the result (JSON-ready, without records) and the records."""
    import ray

    from benchmarks.common import start_ray
    from engine.model_loader import load_tokenizer

    t_start = time.monotonic()
    load_before = os.getloadavg()
    slos = {"short": SLO_SHORT, "long": SLO_LONG}
    tokenizer = load_tokenizer(model)
    traces = {}
    for scale in settings.scales:
        events = trace_events(settings.phases, settings.seed, scale)
        traces[f"{scale:g}"] = (make_requests(tokenizer, events, settings.seed), tuple(e.t for e in events))
        log(f"trace × {scale:g}: {len(events)} requests ({sum(e.kind == 'long' for e in events)} long)")
    warm = make_requests(tokenizer, [TraceEvent(0.0, k, 0) for k in ("short", "short", "long")], settings.seed + 100)
    result: dict[str, Any] = {"model": model, "settings": {**asdict(settings), "autoscale": dict(settings.autoscale)},
                              "arms": {}}
    records: dict[str, dict[str, list[RequestRecord]]] = {}
    low, high = totals(settings)
    start_ray(NAMESPACE, num_cpus=int(math.ceil(high * WORKER_CPUS)))
    others: list[float] = []
    try:
        with CpuSampler() as cpu:
            def do(arm: str) -> None:
                cfg = arm_config(arm, model, settings)
                entry = result["arms"].setdefault(arm, {"runs": {}, "samples": {}})
                for key, (requests, times) in traces.items():
                    recs, sampler, env = run_arm(arm, cfg, requests, times, warm, cpu)
                    records.setdefault(arm, {})[key] = recs
                    entry["runs"][key] = {**analyze_run(recs, sampler.workers, slos, settings.phases,
                                                        settings.window_s), "other_cores": env["other_cores"]}
                    entry["samples"][key] = sampler.workers
                    if env["other_cores"] is not None:
                        others.append(env["other_cores"])
                    if arm == AUTOSCALED and key == f"{settings.scales[0]:g}":
                        entry["decisions"], entry["latencies"] = decisions_and_latencies(sampler.tables)
                entry["goodput"] = arm_goodput(entry["runs"], mean_rate(settings.phases))

            if settings.static_first:  # an order control: does running first cost an arm anything?
                for arm in settings.static:
                    do(arm)
            do(AUTOSCALED)
            avg = result["arms"][AUTOSCALED]["runs"][f"{settings.scales[0]:g}"]["avg_workers"]
            total = min(high, max(low, round(avg)))
            static = settings.static or tuple(f"{p}:{total - p}" for p in range(1, total))
            log(f"autoscaled arm averaged {avg:.2f} workers: static splits {static}")
            if not settings.static_first:
                for arm in static:
                    do(arm)
    finally:
        ray.shutdown()
    result["comparison"] = compare(result)
    result["machine"] = {"cpu_count": os.cpu_count(), "loadavg_before_run": [round(x, 2) for x in load_before],
                         "loadavg_after_run": [round(x, 2) for x in os.getloadavg()],
                         "other_cores": round(sum(others) / len(others), 2) if others else None,
                         "wall_s": round(time.monotonic() - t_start, 1)}
    return result, records


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """The command line and the :class:`Settings` it asks for."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="phases half as long")
    ap.add_argument("--scales", help="rate multipliers, comma-separated (default 1); two or more interpolate a goodput")
    ap.add_argument("--static", help="static P:D splits to run, comma-separated (default: every split of the "
                                     "autoscaled arm's average worker count)")
    ap.add_argument("--workers", type=range_arg, metavar="MIN:MAX",
                    help=f"the autoscaled arm's total workers (default {MIN_TOTAL}:{MAX_TOTAL}; MIN = MAX: role "
                         "switching only)")
    ap.add_argument("--advisory", action="store_true",
                    help="the autoscaled arm decides but changes nothing (pools.autoscale.advisory): a control that "
                         "costs what the autoscaler's polling costs and nothing else")
    ap.add_argument("--static-first", action="store_true", help="run the --static splits before the autoscaled arm")
    ap.add_argument("--json", metavar="PATH", help="write the figures (no per-request records) to PATH")
    ap.add_argument("--records", metavar="PATH", help="write every request's record to PATH")
    ap.add_argument("--markdown", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH", help="write the attainment-over-time PNG to PATH (docs/autoscale.png)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    settings = Settings(seed=args.seed)
    if args.quick:
        settings = replace(settings, phases=QUICK_PHASES)
    if args.scales:
        settings = replace(settings, scales=tuple(float(x) for x in args.scales.split(",")))
    if args.workers:
        if args.workers[0] < MIN_TOTAL:
            ap.error(f"--workers: at least {MIN_TOTAL} (one worker per pool)")
        auto = {**dict(settings.autoscale), "min_total": args.workers[0], "max_total": args.workers[1]}
        settings = replace(settings, autoscale=tuple(auto.items()))
    if args.static:
        settings = replace(settings, static=tuple(x.strip() for x in args.static.split(",")))
    if args.static_first:
        if not args.static:
            ap.error("--static-first needs --static (the default splits follow the autoscaled arm's average)")
        settings = replace(settings, static_first=True)
    if args.advisory:
        settings = replace(settings, autoscale=tuple({**dict(settings.autoscale), "advisory": True}.items()))
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    result, records = run(settings, args.model)
    # The JSON form first (what the plot is drawn from, so that the PNG's digest is that of the file
    # written next to it), and written before anything renders: a report bug loses no run.
    result = json.loads(json.dumps(result, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.records:
        Path(args.records).write_text(json.dumps({a: {k: [r.to_dict() for r in rs] for k, rs in v.items()}
                                                  for a, v in records.items()}))
    md = render_markdown(result)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.plot:
        log(f"wrote {write_plot(result, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
