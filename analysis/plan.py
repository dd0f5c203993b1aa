"""Plan a deployment: the cheapest prefill:decode split and worker count that meets a rate and SLOs.

    python -m analysis.plan --model llama-3.1-70b --hardware H100 --rate 100 \\
        --input-len 512:2048 --output-len 64:256 --ttft 1.0 --tpot 0.05
    python -m analysis.plan --docs docs/planning.md     # the 70B on H100 plans at 10, 100, 1,000 req/s
    python -m analysis.plan --engine-json engine.json [--overhead-json cluster.json] --rate 2 \
        --input-len 128:384 --output-len 16:48 --ttft 2 --tpot 0.15   # calibrated: measured step costs

(``python -m cluster.plan`` is the same command.) Each candidate is run
through :func:`analysis.serving_sim.simulate`, a discrete-event simulation of
router, both pools, batching and KV transfer, with step times from the
roofline of :mod:`analysis.cost_model` on datasheet hardware
(:mod:`analysis.hardware`) scaled by ``--efficiency``, or, with
``--engine-json`` (a ``benchmarks.engine`` JSON; ``--overhead-json``, a
``benchmarks.cluster_overhead`` one, for the KV transfer and serving path),
from the step times measured there (:mod:`analysis.calibration`; one worker =
the engine as measured). ``benchmarks.plan_validation`` checks the
calibrated simulation against measured runs. The search follows
DistServe's placement search: size each phase on its own with the other one
ample (prefill against the TTFT target, decode against both: with prefill
ample, a TTFT miss means requests wait for decode KV room), starting from
the worker counts of :class:`analysis.bottleneck.PhaseSplit` and growing
until the phase's attainment is met, then grow the pool that misses more
until both targets hold together. Cost = workers x devices per worker.

What it does not model (said in the output too): prefix caching, preemption,
chunked prefill, router overhead, network contention between transfers, and
any step time but the roofline's (real kernels: set ``--efficiency``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from analysis.bottleneck import PRESETS, PhaseSplit, devices_needed
from analysis.calibration import from_benchmarks
from analysis.cost_model import dtype_bytes
from analysis.hardware import PROFILES
from analysis.serving_sim import SLO, SimResult, StepCosts, Workload, simulate

DOCS_RATES = (10.0, 100.0, 1000.0)
DEVICES_PER_NODE = 8
MIN_BATCH = 16
CAVEATS = ("no prefix caching, preemption or chunked prefill; no router overhead; transfers do not contend "
           "for the link; step times are roofline / efficiency + a fixed overhead")


@dataclass(frozen=True)
class Plan:
    result: SimResult
    devices_per_worker: int
    tried: int  # simulations run

    @property
    def workers(self) -> int:
        return self.result.prefill + self.result.decode

    @property
    def devices(self) -> int:
        return self.workers * self.devices_per_worker


def _smallest(meets, lo: int) -> tuple[int, SimResult]:
    """The smallest n >= lo with meets(n) true (doubling, then bisection); meets returns (ok, result)."""
    n = max(lo, 1)
    ok, res = meets(n)
    if ok:
        while n > 1:
            ok2, res2 = meets(n - 1)
            if not ok2:
                break
            n, res = n - 1, res2
        return n, res
    hi = n * 2
    while True:
        ok, res = meets(hi)
        if ok:
            break
        n, hi = hi, hi * 2
        if hi > 100_000:
            raise RuntimeError("no pool size up to 100,000 workers meets the target")
    while hi - n > 1:  # meets(n) false, meets(hi) true
        mid = (n + hi) // 2
        ok, r = meets(mid)
        if ok:
            hi, res = mid, r
        else:
            n = mid
    return hi, res


def estimate(costs: StepCosts, wl: Workload, max_running: int, max_batched_tokens: int) -> dict[str, int]:
    """Workers per pool with every worker fully busy (:class:`PhaseSplit` at the mean lengths):
    the search's starting point, and a lower bound to prune tensor-parallel sizes with."""
    mean_in = sum(wl.input_len) / 2
    mean_out = sum(wl.output_len) / 2
    batch = max(1, costs.max_batch(int(mean_in + mean_out), max_running))
    prompts = max(1, max_batched_tokens // int(mean_in))
    split = PhaseSplit(costs.prefill_s([int(mean_in)] * prompts) / prompts,
                       costs.decode_s(batch, mean_in + mean_out / 2) * (mean_out - 1) / batch)
    return split.workers(wl.rate)


def plan(costs: StepCosts, wl: Workload, slo: SLO, *, max_running: int = 256,
         max_batched_tokens: int = 8192) -> Plan:
    """The cheapest (prefill, decode) meeting ``slo`` for ``wl`` (see the module docstring)."""
    tried = 0

    def sim(p: int, d: int) -> SimResult:
        nonlocal tried
        tried += 1
        return simulate(costs, wl, slo, p, d, max_running=max_running, max_batched_tokens=max_batched_tokens)

    est = estimate(costs, wl, max_running, max_batched_tokens)
    ample_p, ample_d = est["prefill"] * 3 + 2, est["decode"] * 3 + 2
    p, _ = _smallest(lambda n: ((r := sim(n, ample_d)).ttft_attainment >= slo.attainment, r), est["prefill"])
    # With prefill ample, a TTFT miss is decode's too: requests wait in the router for KV room.
    d, res = _smallest(lambda n: ((r := sim(ample_p, n)).attainment >= slo.attainment, r), est["decode"])
    res = sim(p, d)
    while res.attainment < slo.attainment:  # together they miss: grow whichever pool helps more
        more_p, more_d = sim(p + max(1, p // 10), d), sim(p, d + max(1, d // 10))
        res = more_p if more_p.attainment >= more_d.attainment else more_d
        p, d = res.prefill, res.decode
    return Plan(res, costs.devices, tried)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def costs_for(model: str, hardware: str, dtype: str, devices: int | None, efficiency: float, overhead_s: float,
              link_gb_s: float, context: int, batch: int) -> StepCosts:
    dims, _ = PRESETS[model]
    hw = PROFILES[hardware]
    if devices is None:
        devices = devices_needed(dims.param_bytes(dtype_bytes(dtype)),
                                 dims.kv_cache_bytes(batch, context, dtype_bytes(dtype)), hw.memory_bytes * 0.9)
    return StepCosts(dims, hw, dtype, devices, efficiency, overhead_s, link_gb_s * 1e9)


def candidate_costs(args: argparse.Namespace) -> list[StepCosts]:
    """Step costs per tensor-parallel size to try: ``--devices``, or every power of two up to a node."""
    sizes = [args.devices] if args.devices else [1, 2, 4, DEVICES_PER_NODE]
    return [costs_for(args.model, args.hardware, args.dtype, n, args.efficiency, args.overhead_ms / 1000,
                      args.link_gb_s, args.input_len[1] + args.output_len[1], args.max_running) for n in sizes]


def render(model: str, hardware: str, costs: StepCosts, wl: Workload, slo: SLO, p: Plan) -> str:
    r = p.result
    nodes = math.ceil(p.devices / DEVICES_PER_NODE)
    return "\n".join([
        f"{model} on {hardware} x {costs.devices} per worker, {wl.rate:g} req/s, prompts {wl.input_len[0]}-"
        f"{wl.input_len[1]}, outputs {wl.output_len[0]}-{wl.output_len[1]} tokens; SLO TTFT <= {slo.ttft_s:g} s, "
        f"TPOT <= {slo.tpot_s * 1000:g} ms for {slo.attainment:.0%}",
        f"  cheapest: prefill:decode = {r.prefill}:{r.decode} ({p.workers} workers, {p.devices} {hardware}s, "
        f"{nodes} node(s) of {DEVICES_PER_NODE})",
        f"  simulated: TTFT p50/p90/p99 {r.ttft_s[0]:.3f}/{r.ttft_s[1]:.3f}/{r.ttft_s[2]:.3f} s; TPOT p50/p90/p99 "
        f"{r.tpot_s[0] * 1000:.1f}/{r.tpot_s[1] * 1000:.1f}/{r.tpot_s[2] * 1000:.1f} ms; attainment "
        f"{r.attainment:.1%} (TTFT {r.ttft_attainment:.1%}, TPOT {r.tpot_attainment:.1%}); "
        f"{r.throughput:.1f} req/s over the run (arrivals and drain); {p.tried} simulations",
    ])


DOCS_HEADER = """# Planning large deployments

Generated by `python -m analysis.plan --docs docs/planning.md` (also `python -m cluster.plan`);
do not edit by hand. Each plan is the cheapest prefill:decode split that meets the SLOs in a
discrete-event simulation of the router, both pools, continuous batching and KV transfer
(`analysis/serving_sim.py`), with step times from the roofline of the analytical cost model on
the H100 datasheet, at {eff:.0%} of the roofline plus {ovh:g} ms per step, and KV moving at
{link:g} GB/s per transfer (a 400 Gb/s network). A worker is a tensor-parallel group of 1, 2, 4
or 8 H100s; the planner tries each size that can batch and keeps the cheapest.

Workload: Llama 3.1 70B (bf16), prompts of 256-2048 tokens, outputs of 64-512 tokens, uniform;
Poisson arrivals. SLOs: TTFT <= {ttft:g} s and TPOT <= {tpot:g} ms for 90% of requests.

Not modelled: {caveats}. These are paper plans: real kernels, the network and
the router move the answer; calibrate `--efficiency` and `--overhead-ms` from a measured run
before buying hardware.

"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-70b", choices=sorted(PRESETS))
    ap.add_argument("--hardware", default="H100", choices=sorted(PROFILES))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--devices", type=int, help="devices per worker (tensor parallel); default: fewest that fit")
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--input-len", type=_range, default=(256, 2048), help="LO:HI prompt tokens")
    ap.add_argument("--output-len", type=_range, default=(64, 512), help="LO:HI output tokens")
    ap.add_argument("--ttft", type=float, default=2.0, help="TTFT target, seconds")
    ap.add_argument("--tpot", type=float, default=0.05, help="TPOT target, seconds")
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--efficiency", type=float, default=0.5, help="share of the roofline the kernels reach")
    ap.add_argument("--overhead-ms", type=float, default=3.0, help="fixed time per engine step")
    ap.add_argument("--link-gb-s", type=float, default=50.0, help="KV transfer rate per transfer, GB/s")
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--requests", type=int, help="simulated requests (default: 30 s of traffic, 1,000 to 20,000)")
    ap.add_argument("--docs", type=Path, help="write the 70B / H100 plans at 10, 100, 1,000 req/s to this file")
    ap.add_argument("--engine-json", type=Path, help="calibrate: step costs measured by benchmarks.engine (JSON)")
    ap.add_argument("--overhead-json", type=Path, help="with --engine-json: KV transfer and serving path measured by "
                                                       "benchmarks.cluster_overhead (JSON)")
    ap.add_argument("--kv-tokens", type=int, default=512 * 16, help="with --engine-json: a decode worker's KV tokens")
    args = ap.parse_args(argv)
    if args.docs and args.engine_json:
        ap.error("--docs writes the datasheet plans; --engine-json plans this machine's measured worker")
    slo = SLO(args.ttft, args.tpot, args.attainment)
    rates = DOCS_RATES if args.docs else (args.rate,)
    out = []
    for rate in rates:
        n = args.requests or int(min(max(rate * 30, 1000), 20000))
        wl = Workload(rate, args.input_len, args.output_len, requests=n)
        best = None
        # A size whose memory leaves room for fewer than MIN_BATCH full-length requests cannot batch decode.
        if args.engine_json:
            engine = json.loads(args.engine_json.read_text())
            overhead = json.loads(args.overhead_json.read_text()) if args.overhead_json else None
            sizes = [from_benchmarks(engine, overhead, args.kv_tokens, source=args.engine_json.name)]
            print(sizes[0].describe())
        else:
            sizes = [c for c in candidate_costs(args)
                     if c.max_batch(wl.input_len[1] + wl.output_len[1], MIN_BATCH) >= MIN_BATCH]
        bound = {c.devices: sum(estimate(c, wl, args.max_running, 8192).values()) * c.devices for c in sizes}
        for costs in sorted(sizes, key=lambda c: bound[c.devices]):
            if best is not None and bound[costs.devices] >= best[1].devices:
                continue  # even fully busy workers of this size cost more than the best plan
            p = plan(costs, wl, slo, max_running=args.max_running)
            if best is None or p.devices < best[1].devices:
                best = (costs, p)
        if best is None:
            raise SystemExit("no tensor-parallel size up to 8 devices holds the weights and one request's KV")
        model, hardware = ((engine.get("machine", {}).get("model", {}).get("name", "measured model"), "measured worker")
                           if args.engine_json else (args.model, args.hardware))
        out.append(render(model, hardware, best[0], wl, slo, best[1]))
        print(out[-1], flush=True)
    if args.docs:
        text = DOCS_HEADER.format(eff=args.efficiency, ovh=args.overhead_ms, link=args.link_gb_s, ttft=args.ttft,
                                  tpot=args.tpot * 1000, caveats=CAVEATS)
        text += "\n\n".join(f"## {rate:,.0f} requests/s\n\n```\n{block}\n```" for rate, block in zip(rates, out)) + "\n"
        args.docs.write_text(text)
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
