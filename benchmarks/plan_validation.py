"""Validate the planner's simulation against measured serving on this machine.

    python -m benchmarks.plan_validation [--engine-json PATH] [--overhead-json PATH] [--markdown PATH] [--json PATH]

1. **Calibrate.** Per-phase step costs from a ``benchmarks.engine`` JSON
   (``--engine-json``), or, without one, from a fresh
   ``benchmarks.engine --quick --formats '' --skip-mixed`` run with one torch
   thread (``OMP_NUM_THREADS=1``: what a worker of ``num_cpus`` 1 gets), and
   the KV transfer and serving path from a ``benchmarks.cluster_overhead``
   JSON (``--overhead-json``) or the defaults of :mod:`analysis.calibration`.
2. **Measure.** A 1:1 SmolLM2 deployment (:func:`benchmarks.deployments.make_config`,
   one CPU per worker, gloo), then ``benchmarks.serve`` at each of three
   Poisson rates, one run per rate, each with its own seed (so that no prompt
   is served from the prefix cache of an earlier run).
3. **Predict.** :func:`analysis.serving_sim.simulate` with the calibrated costs
   on the same workload shape: the same rate, length ranges, request count
   and SLO, over ``SIM_SEEDS`` seeds pooled (a run of a few dozen requests
   from an empty cluster is a transient, not a steady state: the simulation
   replays the same transient many times).
4. **Compare.** TTFT and TPOT p50/p90/p99 and SLO attainment, measured and
   predicted side by side, with the relative errors ((predicted - measured) /
   measured; attainment: the difference in points).
5. **Contention** (``--contention fit``): the engine was measured alone; in the
   deployment its two workers share 2 cores and one memory bus with each
   other, the router and the client. A second prediction scales the decode
   and the prefill steps by two factors fitted on the lowest rate (so that
   the simulated TPOT p50 and TTFT p50 match the measured ones there) and is
   judged on the other rates, which the fit never saw.

``--save-dir DIR`` keeps the engine JSON and each rate's ``benchmarks.serve``
JSON; ``--serve-dir DIR`` predicts against the runs saved there instead of
serving again (e.g. to try another calibration on the same measurements).

The machine is shared: load averages before and after are recorded.
"""

from __future__ import annotations

from cluster.local_ray import apply_ray_env

# Ray reads its environment when it is imported: token auth and loopback only, set before any import of ray.
apply_ray_env()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from analysis.calibration import MeasuredCosts, from_benchmarks, relative_error  # noqa: E402
from analysis.model_catalog import DEFAULT_MODEL  # noqa: E402
from analysis.serving_sim import SLO, Workload, simulate  # noqa: E402
from benchmarks.common import log  # noqa: E402
from benchmarks.slo import percentile  # noqa: E402

RATES = (0.5, 1.0, 1.5)
INPUT_LEN = (128, 384)
OUTPUT_LEN = (16, 48)
REQUESTS = 30           # per rate
TTFT_S, TPOT_S = 2.0, 0.15
SIM_SEEDS = 40
WORKER_CPUS = 1.0
NUM_BLOCKS, BLOCK_TOKENS, MAX_RUNNING = 512, 16, 32
QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class Figures:
    """Percentiles (s) of TTFT and TPOT and the SLO attainment (both limits) of one run or prediction."""

    ttft_s: tuple[float, float, float]
    tpot_s: tuple[float, float, float]
    attainment: float


def predict(costs: MeasuredCosts, rate: float, requests: int = REQUESTS, seeds: int = SIM_SEEDS,
            input_len: tuple[int, int] = INPUT_LEN, output_len: tuple[int, int] = OUTPUT_LEN) -> Figures:
    """The simulation of a 1:1 deployment over ``seeds`` replays of a ``requests``-long run, pooled."""
    slo = SLO(TTFT_S, TPOT_S)
    ttft: list[float] = []
    tpot: list[float] = []
    met = 0
    for seed in range(seeds):
        r = simulate_detail(costs, Workload(rate, input_len, output_len, requests=requests, seed=seed), slo)
        ttft += r[0]
        tpot += r[1]
        met += sum(a <= TTFT_S and b <= TPOT_S for a, b in zip(r[0], r[1]))
    n = len(ttft)
    return Figures(tuple(percentile(ttft, q) for q in QUANTILES),  # type: ignore[arg-type]
                   tuple(percentile(tpot, q) for q in QUANTILES), met / n)  # type: ignore[arg-type]


def simulate_detail(costs: MeasuredCosts, wl: Workload, slo: SLO) -> tuple[list[float], list[float]]:
    """Per-request TTFT and TPOT of one simulated run (the simulator's percentiles are nearest-rank
    over one run; pooling runs needs the samples). Recovered by simulating each request's run once
    and reading the per-request figures through :func:`analysis.serving_sim.simulate`'s hook."""
    samples: dict[str, list[float]] = {}
    simulate(costs, wl, slo, 1, 1, max_running=MAX_RUNNING, max_batched_tokens=2048, samples=samples)
    return samples["ttft_s"], samples["tpot_s"]


def measured_figures(run: dict) -> Figures:
    """Figures of one ``benchmarks.serve`` run (its JSON's ``runs[0]``), percentiles as serve computes them."""
    recs = [r for r in run["records"] if r["ok"]]
    ttft = [r["ttft_ms"] / 1000 for r in recs if r["ttft_ms"] is not None]
    tpot = [r["tpot_ms"] / 1000 for r in recs if r["tpot_ms"] is not None]
    return Figures(tuple(percentile(ttft, q) for q in QUANTILES),  # type: ignore[arg-type]
                   tuple(percentile(tpot, q) for q in QUANTILES), run["summary"]["attainment"]["both"])


def compare(measured: Figures, predicted: Figures) -> dict:
    """Relative errors of every percentile; attainment as a difference in points."""
    out = {}
    for name in ("ttft_s", "tpot_s"):
        for q, m, p in zip(QUANTILES, getattr(measured, name), getattr(predicted, name)):
            out[f"{name[:4]}_p{q}"] = relative_error(p, m)
    out["attainment_points"] = (predicted.attainment - measured.attainment) * 100
    return out


def render(rows: list[dict], costs: MeasuredCosts, machine: dict, title: str = "") -> str:
    """The side-by-side table (one row per rate and metric)."""
    lines = ["## Planner validation: simulation vs measured `benchmarks.serve` (this machine)" + title, "",
             f"1:1 {DEFAULT_MODEL}, float32, one CPU (one torch thread) per worker, gloo; Poisson, {REQUESTS} "
             f"requests per rate, prompts {INPUT_LEN[0]}-{INPUT_LEN[1]}, "
             f"outputs {OUTPUT_LEN[0]}-{OUTPUT_LEN[1]} tokens; "
             f"SLO TTFT ≤ {TTFT_S:g} s, TPOT ≤ {TPOT_S * 1000:g} ms. Simulation: {SIM_SEEDS} replays pooled.",
             f"Calibration: {costs.describe()}.",
             f"Machine: load average {machine['loadavg_before']} before, {machine['loadavg_after']} after; "
             f"wall {machine['wall_s']} s.", "",
             "| rate (req/s) | metric | measured | predicted | error |", "|---|---|---|---|---|"]
    for row in rows:
        m, p, e = Figures(**row["measured"]), Figures(**row["predicted"]), row["errors"]
        for name, unit, scale in (("ttft_s", "s", 1.0), ("tpot_s", "ms", 1000.0)):
            for i, q in enumerate(QUANTILES):
                err = e[f"{name[:4]}_p{q}"]
                lines.append(f"| {row['rate']:g} | {name[:4].upper()} p{q} ({unit}) | "
                             f"{getattr(m, name)[i] * scale:.3g} | "
                             f"{getattr(p, name)[i] * scale:.3g} | {'–' if math.isnan(err) else f'{err:+.0%}'} |")
        lines.append(f"| {row['rate']:g} | SLO attainment | {m.attainment:.0%} | {p.attainment:.0%} | "
                     f"{e['attainment_points']:+.0f} points |")
        if row.get("fitted"):
            lines[-1] = lines[-1][:-1] + "(the rate the contention factor was fitted on) |"
    return "\n".join(lines) + "\n"


def table(rates: tuple[float, ...], measured: list[Figures], costs: MeasuredCosts,
          fitted_on: float | None = None) -> list[dict]:
    """One row per rate: measured, predicted with ``costs``, the errors."""
    rows = []
    for rate, m in zip(rates, measured):
        p = predict(costs, rate)
        rows.append({"rate": rate, "measured": asdict(m), "predicted": asdict(p), "errors": compare(m, p),
                     "fitted": rate == fitted_on})
    return rows


def fit_factor(target: float, figure, lo: float = 0.25, hi: float = 8.0, steps: int = 14) -> float:
    """The factor in [lo, hi] at which ``figure(factor)`` (increasing) reaches ``target``, by bisection
    on a log scale; an end of the range when the target lies beyond it."""
    if figure(lo) >= target:
        return lo
    if figure(hi) <= target:
        return hi
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if figure(mid) < target else (lo, mid)
    return math.sqrt(lo * hi)


def contention_factors(costs: MeasuredCosts, rate: float, measured: Figures) -> tuple[float, float]:
    """(decode, prefill) step factors with which the simulation at ``rate`` reproduces the measured
    TPOT p50 (decode first, prefill as measured) and then TTFT p50 (decode scaled)."""
    seeds = SIM_SEEDS // 4  # a fit needs a dozen simulations: fewer replays each
    dec = fit_factor(measured.tpot_s[0], lambda k: predict(costs.scaled(k, 1.0), rate, seeds=seeds).tpot_s[0])
    pre = fit_factor(measured.ttft_s[0], lambda k: predict(costs.scaled(dec, k), rate, seeds=seeds).ttft_s[0])
    return dec, pre


def calibrate(engine_json: str | None, overhead_json: str | None,
              save_dir: Path | None = None) -> tuple[MeasuredCosts, dict]:
    """Costs from the given JSON files, running ``benchmarks.engine`` (one thread) when none is given."""
    if engine_json is None:
        out = (save_dir or Path(tempfile.mkdtemp(prefix="plan-validation-"))) / "engine.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        log("calibrating: benchmarks.engine --quick, float32 only, one torch thread")
        subprocess.run([sys.executable, "-m", "benchmarks.engine", "--quick", "--formats", "", "--skip-mixed",
                        "--json", str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL, timeout=900)
        engine_json = str(out)
    engine = json.loads(Path(engine_json).read_text())
    overhead = json.loads(Path(overhead_json).read_text()) if overhead_json else None
    threads = engine.get("machine", {}).get("torch_threads")
    if threads != 1:
        log(f"warning: the engine JSON was measured with {threads} torch threads; a worker here has 1")
    costs = from_benchmarks(engine, overhead, NUM_BLOCKS * BLOCK_TOKENS,
                            source=f"{Path(engine_json).name}, {threads} thread(s)"
                                   + (f", {Path(overhead_json).name}" if overhead_json else ", default transfer"))
    return costs, {"engine_json": engine_json, "overhead_json": overhead_json, "torch_threads": threads}


def measure(rates: tuple[float, ...], model: str, save_dir: Path | None = None) -> list[dict]:
    """One ``benchmarks.serve`` run per rate against a fresh 1:1 deployment; each run's JSON
    (kept as ``serve-<rate>.json`` in ``save_dir`` when given)."""
    from benchmarks import serve
    from benchmarks.common import start_ray
    from benchmarks.deployments import make_config, running

    cfg = make_config(model=model, ratio="1:1", replicas=2,
                      router={"metrics_port": None, "http_port": None, "request_timeout_s": 300},
                      kvtransfer={"timeout_s": 120, "lease_s": 120.0},
                      prefill={"num_cpus": WORKER_CPUS, "max_batched_tokens": 2048},
                      decode={"num_cpus": WORKER_CPUS, "num_blocks": NUM_BLOCKS, "max_running": MAX_RUNNING})
    import ray

    start_ray("bench-plan-validation", num_cpus=int(2 * WORKER_CPUS))
    runs = []
    tmp = save_dir or Path(tempfile.mkdtemp(prefix="plan-validation-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with running(cfg) as (_, address):
            for k, rate in enumerate(rates):
                out = tmp / f"serve-{rate:g}.json"
                argv = ["--address", address, "--model", model, "--workload", "short",
                        "--short-input", f"{INPUT_LEN[0]}:{INPUT_LEN[1]}",
                        "--short-output", f"{OUTPUT_LEN[0]}:{OUTPUT_LEN[1]}", "--num-requests", str(REQUESTS),
                        "--seed", str(100 + k), "--rates", f"{rate:g}", "--warmup", "2",
                        "--ttft-slo-ms", f"{TTFT_S * 1000:g}", "--tpot-slo-ms", f"{TPOT_S * 1000:g}",
                        "--timeout-s", "300", "--json", str(out), "--no-progress"]
                log(f"benchmarks.serve {' '.join(argv)}")
                if serve.main(argv) != 0:
                    raise RuntimeError(f"benchmarks.serve failed at {rate:g} req/s")
                runs.append(json.loads(out.read_text())["runs"][0])
    finally:
        ray.shutdown()
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-json", help="a benchmarks.engine JSON (default: run it, one thread, quick)")
    ap.add_argument("--overhead-json", help="a benchmarks.cluster_overhead JSON (default: the built-in transfer costs)")
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--contention", choices=("none", "fit"), default="fit",
                    help="fit: also predict with every engine step scaled by a factor fitted on the lowest rate")
    ap.add_argument("--save-dir", type=Path, help="keep the engine and serve JSONs here")
    ap.add_argument("--serve-dir", type=Path, help="use the serve-<rate>.json runs saved here instead of serving")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--markdown", metavar="PATH")
    args = ap.parse_args(argv)
    rates = tuple(float(x) for x in args.rates.split(","))
    if len(rates) != len(set(rates)):
        ap.error("--rates must differ")
    t0 = time.monotonic()
    before = [round(x, 2) for x in os.getloadavg()]
    costs, calibration = calibrate(args.engine_json, args.overhead_json, args.save_dir)
    log(costs.describe())
    if args.serve_dir:
        runs = [json.loads((args.serve_dir / f"serve-{r:g}.json").read_text())["runs"][0] for r in rates]
    else:
        runs = measure(rates, args.model, args.save_dir)
    measured = [measured_figures(run) for run in runs]
    rows = table(rates, measured, costs)
    machine = {"loadavg_before": before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "wall_s": round(time.monotonic() - t0, 1), "cpu_count": os.cpu_count()}
    md = render(rows, costs, machine)
    fitted: dict = {}
    if args.contention == "fit":
        low = min(range(len(rates)), key=lambda i: rates[i])
        dec, pre = contention_factors(costs, rates[low], measured[low])
        scaled = costs.scaled(dec, pre)
        fitted = {"decode_factor": dec, "prefill_factor": pre, "fitted_on_rate": rates[low],
                  "rows": table(rates, measured, scaled, rates[low])}
        md += "\n" + render(fitted["rows"], scaled, machine,
                            f", contention fitted at {rates[low]:g} req/s: decode × {dec:.2f}, prefill × {pre:.2f}")
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": {**calibration, "costs": asdict(costs)}, "rows": rows,
                                               "contention": fitted, "machine": machine}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
