"""Colocated vs disaggregated serving under prefill/decode interference, side by side in one run.

Run from the repository root::

    python -m benchmarks.colocated_vs_disaggregated [--quick] [--json PATH] [--markdown PATH] [--plots DIR]

One process, one local Ray cluster (:func:`benchmarks.common.start_ray`,
127.0.0.1, token auth, shut down at the end, also on error). The same seeded
trace runs against four arms of the same cluster code, each a
``cluster.deployment.BackgroundDeployment`` with its router in this process
and two single-threaded worker actors of ``num_cpus`` 1 (Ray gives an actor of
``num_cpus`` 1 one OpenMP / torch thread; checked and recorded), so every arm
has the same 2 cores' worth of workers:

(a) ``colocated``: ``pools.mode: colocated``, 2 replicas; each runs both
    phases in one engine. Chunked prefill off: ``pools.decode.max_batched_tokens``
    = ``max_model_len`` (2048) >= the longest prompt, so a long prompt is
    prefilled in one engine step while the replica's running decodes wait.
(b) ``disaggregated``: ``mode: disaggregated``, ratio 1:1 (1 prefill + 1
    decode worker), KV over gloo.
(c) ``chunked``: as (a) with ``max_batched_tokens`` = 128: a long prompt is
    prefilled 128 tokens a step, each step also carrying the running decodes.
(d) ``conditional``: as (b) (prefix caching on, as by default in every arm)
    with ``router.policy: prefix_aware`` and conditional disaggregation
    (``router.conditional_prefill_max_tokens`` = ``CONDITIONAL_TOKENS``, 64): a
    short prompt is prefilled by the decode worker itself, no transfer, unless
    that worker is decoding a batch while the prefill worker idles
    (``router.conditional_prefill_offload_when_idle``, on by default); long
    prompts always use the prefill worker.

All four deployments are up at once (the Ray head declares 8 logical CPUs
for that) but only one arm is driven at a time; the machine's load drifts
(it is shared), so the arms' runs are interleaved, not run arm after arm:
each mixed run is repeated ``rounds`` times per rate, the arms' order rotated
each round, and an arm's rounds are merged on one timeline.

The trace (TTFT, TPOT and goodput as in docs/architecture.md, Measurement) is
the interference case disaggregation exists for, long prompts stalling the
decode of short requests that share a worker with them: a Poisson stream of
short chat-sized requests (32 tokens in, 48 out: decode heavy) at each ``rate`` of the settings, plus one long prompt (768-1024
tokens in, 4 out) every ``long_every_s`` seconds. Prompts are exact-length
raw prompts from :mod:`benchmarks.workloads` (SmolLM2's tokenizer), a fresh set
for every rate and round (prefix caching is on in every arm: a prompt sent
again would be a cache hit, not the prefill under test), sent with
``max_tokens`` = output length and ``ignore_eos`` by
:func:`benchmarks.loadgen.run_trace`; every arm gets the same requests at the
same offsets. In order:

1. start the four deployments (in parallel; start times recorded), then
   warm each up, unrecorded: two short and then two long prompts (not in the
   trace), two at a time, so that both workers of every arm have run both shapes;
2. the undisturbed reference (``reference_arms``; the disaggregated arm by
   default): the trace's short requests alone, no long prompts, for
   ``reference_s`` seconds at the first rate;
3. the mixed trace at each rate, ``rounds`` times, arms interleaved;
4. saturation, per arm: closed loop, ``saturation_concurrency`` short
   requests in flight, ``saturation_requests`` in all: the output tokens/s the
   arm sustains when nothing else limits it (raw throughput).

Measured at the client (:mod:`benchmarks.slo`): TTFT, TPOT, ITL, E2E
(p50/p90/p99/max), throughput, and per request kind. The interference figure
is the ITL of the *short* requests split by whether the gap overlaps a long
request in flight (from its send to its last token: prefill, the KV transfer
and import in (b), and its 3 decode steps), against the ITL of the same run's
quiet gaps and of the short-only reference run: the "undisturbed decode
step". SLO attainment is judged per kind (DistServe sets SLOs per
application): short requests against ``SLO_SHORT``, long ones against
``SLO_LONG``; with two or more rates, a (coarse) DistServe goodput over the
offered total rate is given too.

The machine is shared: a background sampler records, per phase, how many
cores' worth of CPU *other* processes used (machine minus this process and
its descendants, the Ray workers included) and the load average. Absolute
times only mean something next to each other; the report gives ratios
against the colocated arm.

This module starts the arms and drives the trace; turning the records into
figures, the Markdown report and the plots is :mod:`benchmarks.cvd_report`.
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
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from analysis.model_catalog import DEFAULT_MODEL  # noqa: E402
from benchmarks.common import BUSY_WARN_CORES, CpuSampler, busy_cores, log  # noqa: E402
from benchmarks.loadgen import Arrival, FixedConcurrency, Poisson, Scheduled, run_trace  # noqa: E402
from benchmarks.slo import SLO, RequestRecord, goodput, summarize  # noqa: E402
from benchmarks.workloads import BenchRequest, WorkloadSpec, generate  # noqa: E402
from cluster.config import ClusterConfig, parse_config  # noqa: E402
from benchmarks.cvd_report import (  # noqa: E402
    ARMS,
    CONDITIONAL_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    LEASE_S,
    LONG_INPUT,
    LONG_OUTPUT,
    MAX_MODEL_LEN,
    NAMESPACE,
    REPLICAS,
    REQUEST_TIMEOUT_S,
    SHORT_INPUT,
    SHORT_OUTPUT,
    SLO_LONG,
    SLO_SHORT,
    TRANSFER_TIMEOUT_S,
    WORKER_CPUS,
    analyze_run,
    dig,
    rate_key,
    render_markdown,
    write_plots)


@dataclass(frozen=True)
class Settings:
    """How much one run does (``--quick`` shrinks it)."""

    rates: tuple[float, ...]        # short requests/s (Poisson), one mixed run per rate and round
    duration_s: float               # arrivals of one mixed run span [0, duration_s)
    rounds: int                     # mixed runs per rate and arm, the arms interleaved (rotated) per round
    long_every_s: float             # one long prompt every ...
    long_first_s: float             # ... starting here
    saturation_requests: int
    saturation_concurrency: int
    reference_s: float              # the short-only reference run
    reference_arms: tuple[str, ...] = ("disaggregated",)
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    slo_short: SLO = SLO_SHORT
    slo_long: SLO = SLO_LONG
    wait_quiet_s: float = 0.0       # before each measured phase, wait up to this long for a quiet machine
    seed: int = 0


FULL = Settings(rates=(0.5, 1.0), duration_s=25.0, rounds=2, long_every_s=10.0, long_first_s=4.0,
                saturation_requests=48, saturation_concurrency=24, reference_s=30.0)
QUICK = Settings(rates=(0.5,), duration_s=20.0, rounds=1, long_every_s=10.0, long_first_s=4.0,
                 saturation_requests=12, saturation_concurrency=6, reference_s=15.0)


# ------------------------------------------------------------------- configs
def arm_config(arm: str, model: str = DEFAULT_MODEL, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               namespace: str = NAMESPACE) -> dict[str, Any]:
    """The deployment dict of one arm (validate with :func:`cluster.config.parse_config`)."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    decode = {"num_cpus": WORKER_CPUS, "num_blocks": 512, "max_running": 64,
              # colocated without chunking: a whole prompt in one step; chunked: 128 tokens a step
              "max_batched_tokens": chunk_tokens if arm == "chunked" else MAX_MODEL_LEN}
    pools: dict[str, Any] = {"replicas": REPLICAS, "decode": decode}
    if arm in ("disaggregated", "conditional"):
        pools.update(mode="disaggregated", ratio="1:1",
                     prefill={"num_cpus": WORKER_CPUS, "num_blocks": 256, "max_batched_tokens": MAX_MODEL_LEN,
                              "batch_wait_ms": 2.0})
    else:
        pools["mode"] = "colocated"
    router: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "policy": "least_loaded", "metrics_port": None,
                              "http_port": None, "replicas": 1, "drain_grace_s": 10, "request_timeout_s": REQUEST_TIMEOUT_S}
    if arm == "conditional":
        router.update(policy="prefix_aware", conditional_prefill_max_tokens=CONDITIONAL_TOKENS)
    return {
        "model": {"name": model, "dtype": "float32", "max_model_len": MAX_MODEL_LEN},
        "pools": pools,
        "kvtransfer": {"backend": "gloo", "timeout_s": TRANSFER_TIMEOUT_S, "lease_s": LEASE_S},
        "router": router,
        "ray": {"namespace": f"{namespace}-{arm}"},
    }


def total_cpus(cfg: ClusterConfig) -> float:
    """Ray CPUs all of a deployment's worker actors ask for."""
    p, d = cfg.pools.counts()
    return p * cfg.pools.prefill.num_cpus + d * cfg.pools.decode.num_cpus


# --------------------------------------------------------------------- trace
@dataclass(frozen=True)
class TraceSpec:
    """Poisson short requests at ``short_rate`` plus a long prompt every ``long_every_s``
    (none if ``with_long`` is off)."""

    duration_s: float
    short_rate: float
    long_every_s: float
    long_first_s: float
    seed: int = 0
    with_long: bool = True

    def short_times(self) -> list[float]:
        out: list[float] = []
        n = max(8, int(self.short_rate * self.duration_s * 2) + 8)
        for t in Poisson(self.short_rate, seed=self.seed).schedule(n):
            if t >= self.duration_s:
                break
            out.append(t)
        return out

    def long_times(self) -> list[float]:
        if not self.with_long:
            return []
        k = max(0, math.ceil((self.duration_s - self.long_first_s) / self.long_every_s))
        return [t for t in (self.long_first_s + i * self.long_every_s for i in range(k)) if t < self.duration_s]


@dataclass
class RequestPool:
    """Exact-length requests, generated once and shared by every trace (same seed: same texts)."""

    shorts: list[BenchRequest]
    longs: list[BenchRequest]
    warm_shorts: list[BenchRequest]
    warm_longs: list[BenchRequest]


def make_pool(tokenizer, n_short: int, n_long: int, seed: int = 0) -> RequestPool:
    def gen(name: str, n: int, s: int) -> list[BenchRequest]:
        return generate(WorkloadSpec(name=name, num_requests=max(n, 1), seed=s,
                                     short_input=(SHORT_INPUT, SHORT_INPUT), short_output=(SHORT_OUTPUT, SHORT_OUTPUT),
                                     long_input=LONG_INPUT, long_output=(LONG_OUTPUT, LONG_OUTPUT)), tokenizer)

    return RequestPool(gen("short", n_short, seed), gen("long", n_long, seed + 1),
                       gen("short", 2, seed + 1000), gen("long", 2, seed + 1001))


def build_trace(spec: TraceSpec, pool: RequestPool, short_offset: int = 0, long_offset: int = 0
                ) -> tuple[list[BenchRequest], tuple[float, ...]]:
    """The trace's requests in send order (re-indexed) and their send offsets. Its short and long
    prompts are the pool's from ``short_offset`` / ``long_offset`` on: every run takes prompts of
    its own (:func:`fresh_traces`), so that none is a prefix-cache hit from an earlier run."""
    events = [(t, 0, k) for k, t in enumerate(spec.short_times())]
    events += [(t, 1, k) for k, t in enumerate(spec.long_times())]
    events.sort()
    requests = []
    for i, (_, kind, k) in enumerate(events):
        src = pool.shorts[short_offset + k] if kind == 0 else pool.longs[long_offset + k]
        requests.append(replace(src, index=i))
    return requests, tuple(t for t, _, _ in events)


def fresh_traces(specs: Sequence[TraceSpec], pool: RequestPool, short_offset: int = 0
                 ) -> tuple[list[tuple[list[BenchRequest], tuple[float, ...]]], int]:
    """One trace per spec, each with prompts no other uses (caching is on in every arm: a repeated
    prompt would be a cache hit, not a prefill). Returns them and the next unused short prompt."""
    out = []
    long_offset = 0
    for spec in specs:
        out.append(build_trace(spec, pool, short_offset, long_offset))
        short_offset += len(spec.short_times())
        long_offset += len(spec.long_times())
    return out, short_offset


# ------------------------------------------------------------------- running
def run_requests(address: str, requests: list[BenchRequest], arrival: Arrival, prefix: str) -> list[RequestRecord]:
    return asyncio.run(run_trace(address, requests, arrival, timeout_s=REQUEST_TIMEOUT_S,
                                 request_id_prefix=f"{prefix}-{time.time_ns()}"))


def warm_up(address: str, pool: RequestPool) -> None:
    """Two short, then two long prompts, two at a time (both workers of every arm see both shapes)."""
    for group in (pool.warm_shorts, pool.warm_longs):
        recs = run_requests(address, group, Scheduled((0.0,) * len(group)), "warmup")
        bad = [r.error_kind for r in recs if not r.ok]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad} {[r.error for r in recs if not r.ok]}")


def wait_quiet(sampler: CpuSampler, max_wait_s: float, probe_s: float = 3.0) -> float:
    """Wait up to ``max_wait_s`` until other processes use under ``BUSY_WARN_CORES``; seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        t = time.perf_counter()
        time.sleep(probe_s)
        other = sampler.window(t, time.perf_counter())["other_cores"]
        if other is None or other < BUSY_WARN_CORES:
            break
    waited = time.perf_counter() - t0
    if waited > probe_s * 1.5:
        log(f"waited {waited:.0f} s for other processes to go quiet")
    return waited


def worker_threads(num_cpus: float) -> dict[str, Any]:
    """Torch threads of a Ray task with ``num_cpus`` (what the pools' actors get)."""
    import ray

    @ray.remote
    def probe() -> dict[str, Any]:
        import torch

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    return ray.get(probe.options(num_cpus=num_cpus).remote(), timeout=300)


def merge_rounds(rounds: Sequence[Sequence[RequestRecord]]) -> tuple[list[RequestRecord], list[float]]:
    """The records of consecutive rounds of one trace on one timeline: round k's times are shifted
    by the end of round k-1, so that windows, ITL gaps and throughput stay within their round.
    Returns the shifted copies and each round's offset."""
    out: list[RequestRecord] = []
    offsets: list[float] = []
    offset = 0.0
    for recs in rounds:
        offsets.append(offset)
        for r in recs:
            d = r.to_dict()
            for k in ("scheduled_s", "ready_s", "start_s", "end_s"):
                if d[k] is not None:
                    d[k] += offset
            d["token_times_s"] = [t + offset for t in d["token_times_s"]]
            out.append(RequestRecord.from_dict(d))
        ends = [r.end_s for r in recs if r.end_s is not None] + [r.scheduled_s for r in recs]
        offset += max(ends, default=0.0)
    return out, offsets


def merge_env(envs: Sequence[dict]) -> dict:
    """Environment of several phases: mean other/own cores weighted by duration, max load average."""
    timed = [e for e in envs if e.get("other_cores") is not None]
    span = sum(e["span_s"] for e in timed)
    if not timed or span <= 0:
        return {"other_cores": None, "own_cores": None, "loadavg_1m": None}
    return {"other_cores": round(sum(e["other_cores"] * e["span_s"] for e in timed) / span, 2),
            "own_cores": round(sum(e["own_cores"] * e["span_s"] for e in timed) / span, 2),
            "other_cores_max": max(e["other_cores"] for e in timed),
            "loadavg_1m": max(e["loadavg_1m"] for e in timed),
            "waited_for_quiet_s": round(sum(e.get("waited_for_quiet_s", 0.0) for e in envs), 1)}


def rotations(arms: Sequence[str], rounds: int) -> list[list[str]]:
    """Round k runs the arms rotated by k, so that no arm always goes first (drift in the machine's load)."""
    return [list(arms[k % len(arms):]) + list(arms[:k % len(arms)]) for k in range(rounds)]


class Arms:
    """Every arm's deployment up at once (only one is driven at a time), started and stopped together."""

    def __init__(self, configs: dict[str, ClusterConfig]) -> None:
        self.configs = configs
        self.deployments: dict[str, Any] = {}
        self.addresses: dict[str, str] = {}
        self.startup_s: dict[str, float] = {}

    def __enter__(self) -> Arms:
        from concurrent.futures import ThreadPoolExecutor

        from cluster.deployment import BackgroundDeployment

        for arm, cfg in self.configs.items():
            self.deployments[arm] = BackgroundDeployment(cfg)

        def start(arm: str) -> None:
            t = time.perf_counter()
            self.addresses[arm] = self.deployments[arm].start()
            self.startup_s[arm] = round(time.perf_counter() - t, 1)
            log(f"{arm}: up at {self.addresses[arm]} in {self.startup_s[arm]} s")

        try:
            with ThreadPoolExecutor(len(self.configs)) as ex:
                for f in [ex.submit(start, arm) for arm in self.configs]:
                    f.result()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for arm, dep in self.deployments.items():
            try:
                dep.stop()
            except Exception as e:  # stop the others anyway
                log(f"{arm}: stop failed: {e!r}")
        self.deployments.clear()


def run(settings: Settings, arms: Sequence[str], model: str = DEFAULT_MODEL,
        plots_dir: str | None = None) -> dict:
    """Every arm on one local Ray cluster, phases interleaved across arms; the full result (records included)."""
    import ray

    from benchmarks.common import start_ray
    from engine.model_loader import load_tokenizer

    t_start = time.monotonic()
    busy = busy_cores()
    load_before = os.getloadavg()
    log(f"machine busy before the run: {busy} cores of {os.cpu_count()}, load average {load_before}")
    configs = {a: arm_config(a, model, settings.chunk_tokens, f"{NAMESPACE}-{os.getpid()}") for a in arms}
    parsed = {a: parse_config(d, source=f"<arm {a}>") for a, d in configs.items()}
    cpus = {a: total_cpus(c) for a, c in parsed.items()}
    if len(set(cpus.values())) != 1:
        raise RuntimeError(f"arms differ in total CPUs: {cpus}")

    log("building the trace (exact-length prompts)")
    tokenizer = load_tokenizer(model)
    specs = {rate_key(r): TraceSpec(settings.duration_s, r, settings.long_every_s, settings.long_first_s,
                                    settings.seed) for r in settings.rates}
    ref_spec = TraceSpec(settings.reference_s, settings.rates[0], settings.long_every_s, settings.long_first_s,
                         settings.seed, with_long=False)
    # Every (rate, round) run gets prompts of its own, then the reference and saturation (caching is on
    # in every arm: a prompt sent again would be a cache hit, not the prefill this trace is about).
    keys = list(specs)
    run_specs = [specs[k] for k in keys for _ in range(settings.rounds)]
    n_short = (sum(len(s.short_times()) for s in run_specs) + len(ref_spec.short_times())
               + settings.saturation_requests)
    n_long = sum(len(s.long_times()) for s in run_specs)
    pool = make_pool(tokenizer, n_short, n_long, settings.seed)
    built, used = fresh_traces(run_specs, pool)
    traces = {k: built[i * settings.rounds:(i + 1) * settings.rounds] for i, k in enumerate(keys)}
    (reference,), used = fresh_traces([ref_spec], RequestPool(pool.shorts, [], [], []), used)
    saturation = [replace(r, index=i) for i, r in enumerate(pool.shorts[used:used + settings.saturation_requests])]

    result: dict[str, Any] = {
        "model": model, "settings": asdict(settings),
        "configs": {a: {"config": configs[a], "total_cpus": cpus[a]} for a in arms},
        "trace": {k: {"short_times_s": s.short_times(), "long_times_s": s.long_times(),
                      "long_input_tokens": [[r.input_tokens for r in reqs if r.kind == "long"]
                                            for reqs, _ in traces[k]]}
                  for k, s in specs.items()},
        "arms": {a: {"runs": {}} for a in arms},
    }
    records: dict[str, dict[str, list[RequestRecord]]] = {a: {} for a in arms}
    # Logical CPUs: every arm's 2 workers are up at once, but only one arm is driven at a time.
    start_ray(NAMESPACE, num_cpus=int(math.ceil(sum(cpus.values()))))
    try:
        threads = worker_threads(WORKER_CPUS)
        log(f"a worker of num_cpus {WORKER_CPUS:g} runs torch with {threads}")
        with CpuSampler() as sampler, Arms(parsed) as up:
            for arm in arms:
                result["arms"][arm]["startup_s"] = up.startup_s[arm]
                log(f"{arm}: warming up")
                warm_up(up.addresses[arm], pool)

            def phase(arm: str, name: str, requests: list[BenchRequest], arrival: Arrival
                      ) -> tuple[list[RequestRecord], dict]:
                waited = wait_quiet(sampler, settings.wait_quiet_s)
                t0 = time.perf_counter()
                recs = run_requests(up.addresses[arm], requests, arrival, f"{arm}-{name}")
                t1 = time.perf_counter()
                env = {**sampler.window(t0, t1), "span_s": t1 - t0, "waited_for_quiet_s": waited}
                log(f"{arm}: {name}: {sum(r.ok for r in recs)}/{len(recs)} ok in {t1 - t0:.0f} s, "
                    f"other processes {env['other_cores']} cores")
                return recs, env

            for arm in settings.reference_arms:
                if arm in arms:
                    recs, env = phase(arm, "reference", reference[0], Scheduled(reference[1]))
                    result["arms"][arm]["reference"] = {
                        **analyze_run(recs, settings.slo_short, settings.slo_long), "env": merge_env([env]),
                        "records": [r.to_dict() for r in recs]}
            for key, per_round in traces.items():
                rounds: dict[str, list[list[RequestRecord]]] = {a: [] for a in arms}
                envs: dict[str, list[dict]] = {a: [] for a in arms}
                for k, order in enumerate(rotations(arms, settings.rounds)):
                    requests, times = per_round[k]
                    for arm in order:
                        recs, env = phase(arm, f"mixed@{key}#{k}", requests, Scheduled(times))
                        rounds[arm].append(recs)
                        envs[arm].append(env)
                for arm in arms:
                    merged, offsets = merge_rounds(rounds[arm])
                    records[arm][key] = merged
                    result["arms"][arm]["runs"][key] = {
                        **analyze_run(merged, settings.slo_short, settings.slo_long), "env": merge_env(envs[arm]),
                        "round_offsets_s": offsets, "records": [r.to_dict() for r in merged]}
            for arm in arms:
                recs, env = phase(arm, "saturation", saturation, FixedConcurrency(settings.saturation_concurrency))
                result["arms"][arm]["saturation"] = {**summarize(recs, settings.slo_short), "env": merge_env([env])}
    finally:
        ray.shutdown()
    result["machine"] = {"cpu_count": os.cpu_count(), "busy_cores_before_run": busy,
                         "loadavg_before_run": [round(x, 2) for x in load_before],
                         "loadavg_after_run": [round(x, 2) for x in os.getloadavg()],
                         "worker_torch_threads": threads.get("torch_threads"), "worker_threads": threads,
                         "ray": ray.__version__, "wall_s": round(time.monotonic() - t_start, 1)}
    if len(settings.rates) >= 2:
        result["goodput"] = {}
        for a in arms:
            pts = []
            for r in settings.rates:
                run_ = result["arms"][a]["runs"][rate_key(r)]
                offered = run_["all"]["num_requests"] / (settings.duration_s * settings.rounds)
                pts.append((offered, run_["attainment"]["all"]))
            result["goodput"][a] = asdict(goodput(pts))
    if plots_dir:
        for p in write_plots(result, records, plots_dir):
            log(f"wrote {p}")
    return result


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one rate, shorter traces (~4-5 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write every figure (and every request's record) to PATH")
    ap.add_argument("--markdown", metavar="PATH", help="also write the Markdown report to PATH")
    ap.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    ap.add_argument("--rates", help="short requests/s, comma-separated (overrides the settings)")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per mixed run")
    ap.add_argument("--rounds", type=int, help="mixed runs per rate and arm (interleaved across arms)")
    ap.add_argument("--chunk-tokens", type=int, help=f"arm (c)'s max_batched_tokens (default {DEFAULT_CHUNK_TOKENS})")
    ap.add_argument("--short-slo", metavar="TTFT_MS,TPOT_MS",
                    help=f"SLO of the short requests (default {SLO_SHORT.ttft_ms:g},{SLO_SHORT.tpot_ms:g})")
    ap.add_argument("--long-slo", metavar="TTFT_MS,TPOT_MS",
                    help=f"SLO of the long prompts (default {SLO_LONG.ttft_ms:g},{SLO_LONG.tpot_ms:g})")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each measured phase, wait up to S seconds for other processes to go quiet")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)} (debugging)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    over: dict[str, Any] = {"seed": args.seed}
    if args.rates:
        over["rates"] = tuple(float(x) for x in args.rates.split(","))
    if args.duration:
        over["duration_s"] = args.duration
    if args.rounds:
        over["rounds"] = args.rounds
    if args.chunk_tokens:
        over["chunk_tokens"] = args.chunk_tokens
    for flag, name in ((args.short_slo, "slo_short"), (args.long_slo, "slo_long")):
        if flag:
            ttft, tpot = (float(x) for x in flag.split(","))
            over[name] = SLO(ttft_ms=ttft, tpot_ms=tpot)
    over["wait_quiet_s"] = args.wait_quiet
    settings = replace(settings, **over)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arms {bad}; choose from {ARMS}")
    result = run(settings, arms, args.model, args.plots)
    md = render_markdown(result)
    print(md)
    busy = result["machine"]["busy_cores_before_run"]
    worst = max((dig(run_, "env", "other_cores") or 0.0 for a in result["arms"].values()
                 for run_ in a["runs"].values()), default=0.0)
    if (busy or 0.0) > BUSY_WARN_CORES or worst > BUSY_WARN_CORES:
        print(f"warning: other processes used up to {worst} cores during the mixed runs ({busy} busy before): "
              "the figures are noisy; compare arms of this run only (their runs are interleaved, "
              "yet each ran at its own moment)")
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
