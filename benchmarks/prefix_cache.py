"""Prompt caching end to end: ``benchmarks.serve``'s ``shared-prefix`` and
``multi-turn`` workloads against the same disaggregated deployment with the
prefix cache off and on.

Run from the repository root::

    python -m benchmarks.prefix_cache [--quick] [--workloads shared-prefix,multi-turn] \\
        [--no-policies] [--synthetic-answers] [--json PATH] [--markdown PATH]

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
prefill's cost, not queueing), the same seeded requests on both arms. A
multi-turn conversation sends back the answers the server gave (as a chat
client does; ``Settings.replay_answers``), so that the decode worker's cached
blocks of the previous answer can match; the answers are greedy, hence the
same on both arms, and the input lengths are the server's (no longer exact).
Reported per workload and arm: TTFT p50 (all requests; for multi-turn also
turns 2-5 and each turn), its reduction from ``off``, the mean KV bytes moved per request
and the bytes the cache saved (``off``'s mean minus ``on``'s; the router's
per-request ``transfer_bytes_saved`` counts only the partial transfers), the
requests that took the decode-only path, and each pool's prefix-cache hit
rate over the run (the workers' ``prefix_hit_tokens / prefix_queried_tokens``
deltas from ClusterStatus), and where the TTFT went: the median of each
router stage before the first token (queue, prefill queue, prefill, transfer:
``Timings``) and the rest (the first token's way back to the client).

Routing (``--policies``, on by default): the same two workloads, concurrent
(``policy_concurrency`` requests in flight; multi-turn with that many
conversations interleaved), against ``least_loaded`` and ``prefix_aware``
with caching on and conditional disaggregation on both, on 1 prefill + 2
decode workers (the policy has a choice to make only with 2+ workers):
TTFT p50, hit rates, paths and how requests spread over the decode workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from analysis.model_catalog import DEFAULT_MODEL
from benchmarks.loadgen import FixedConcurrency, run_sweep
from benchmarks.slo import SLO, RequestRecord
from benchmarks.workloads import WorkloadSpec, generate, range_arg

ARMS = ("off", "on")
#: The routing comparison's arms: caching and conditional disaggregation on, 2 decode workers.
POLICY_ARMS = ("least_loaded", "prefix_aware")
WORKLOADS = ("shared-prefix", "multi-turn")
#: The router stages that can come before the first token (``Timings`` fields); the rest of the TTFT
#: is the first token's way back (worker -> router -> client).
TTFT_STAGES = ("queue_ms", "prefill_queue_ms", "prefill_ms", "transfer_ms")
MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    shared_prefix_requests: int = 8
    prefix_tokens: int = 1000
    conversations: int = 4           # multi-turn: 16 turns 2-5 per arm (the median of 8 moved by ~5 points run to run)
    turns: int = 5
    output_tokens: tuple[int, int] = (16, 16)  # shared-prefix: answer lengths (only TTFT is measured)
    # multi-turn: answer lengths. They set how fast the history grows, hence what a cache can save:
    # with 16-token answers a turn's new message (~50 tokens) is a quarter to a third of its whole
    # prompt. Chat answers run far longer (LMSYS-Chat-1M: 215 tokens on average); 32-96 stays short
    # of that to keep the run at minutes (benchmarks/README.md).
    turn_output: tuple[int, int] = (32, 96)
    conditional_tokens: int = 128
    replay_answers: bool = True       # multi-turn: send back the served answers (a chat client's history)
    policies: bool = True             # also compare least_loaded with prefix_aware (POLICY_ARMS)
    policy_concurrency: int = 4       # requests in flight in that comparison (= conversations of multi-turn)
    seed: int = 0


FULL = Settings()
QUICK = Settings(shared_prefix_requests=5, conversations=1, policy_concurrency=2)


def arm_config(arm: str, settings: Settings, model: str, namespace: str) -> dict[str, Any]:
    """The deployment dict of one arm (validate with :func:`cluster.config.parse_config`):
    one of :data:`ARMS` (1 prefill + 1 decode worker) or :data:`POLICY_ARMS` (1 + 2)."""
    if arm not in ARMS + POLICY_ARMS:
        raise ValueError(f"arm must be one of {ARMS + POLICY_ARMS}, got {arm!r}")
    on = arm != "off"
    policy = arm if arm in POLICY_ARMS else ("prefix_aware" if on else "least_loaded")
    router: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": None, "drain_grace_s": 10,
                              "policy": policy}
    if on:
        router["conditional_prefill_max_tokens"] = settings.conditional_tokens
    ratio, replicas = ("1:2", 3) if arm in POLICY_ARMS else ("1:1", 2)
    return {
        "model": {"name": model, "dtype": "float32", "max_model_len": MAX_MODEL_LEN},
        "pools": {"mode": "disaggregated", "ratio": ratio, "replicas": replicas,
                  "prefill": {"num_cpus": 1, "num_blocks": 512, "max_batched_tokens": MAX_MODEL_LEN,
                              "prefix_caching": on},
                  "decode": {"num_cpus": 1, "num_blocks": 1024, "prefix_caching": on}},
        "kvtransfer": {"backend": "gloo", "timeout_s": 60, "lease_s": 60.0},
        "router": router,
        "ray": {"namespace": f"{namespace}-{arm}"},
    }


def workload(name: str, settings: Settings, conversations: int | None = None) -> WorkloadSpec:
    """``name``'s spec; ``conversations`` overrides the multi-turn conversation count (and interleave)."""
    if name == "shared-prefix":
        return WorkloadSpec(name=name, num_requests=settings.shared_prefix_requests, seed=settings.seed,
                            prefix_tokens=settings.prefix_tokens, suffix_input=(16, 48),
                            short_output=settings.output_tokens)
    conv = conversations or settings.conversations
    return WorkloadSpec(name=name, num_requests=conv * settings.turns, seed=settings.seed,
                        turns=settings.turns, turn_input=(40, 64), turn_output=settings.turn_output,
                        interleave=conv)


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
        "ttft_stages_p50_ms": ttft_stages(later_turns or ok),
        "decode_workers": {w: sum(1 for r in ok if r.decode_worker == w)
                           for w in sorted({r.decode_worker for r in ok if r.decode_worker})},
        "num_ok": len(ok), "num_requests": len(records),
        "ttft_p50_ms": p50(ok),
        "ttft_p50_turns_2_5_ms": p50(later_turns) if later_turns else None,
        # Turn number (1-based) -> TTFT p50: the saving grows with the history a turn carries.
        "ttft_p50_by_turn_ms": {t + 1: p50([r for r in ok if r.turn == t])
                                for t in sorted({r.turn for r in ok if r.turn is not None})},
        "ttft_ms_by_request": [r.ttft_s * 1000.0 if r.ttft_s is not None else None for r in records],
        "transfer_bytes_mean": mean("transfer_bytes"),
        "transfer_bytes_saved_partial_mean": mean("transfer_bytes_saved"),
        "prefill_cached_tokens_mean": mean("prefill_cached_tokens"),
        "decode_cached_tokens_mean": mean("decode_cached_tokens"),
        "paths": {p: sum(1 for r in ok if r.path == p) for p in sorted({r.path for r in ok})},
        "hit_rate": hit_rate,
    }


def ttft_stages(records: list[RequestRecord]) -> dict[str, float]:
    """Median ms of each of :data:`TTFT_STAGES` over ``records`` (0 where a request skipped it), and
    ``rest``: the median of the client's TTFT minus their sum (the first token's way back)."""
    if not records:
        return {}
    out = {k: statistics.median(r.server.get(k, 0.0) for r in records) for k in TTFT_STAGES}
    rest = [r.ttft_s * 1000.0 - sum(r.server.get(k, 0.0) for k in TTFT_STAGES) for r in records
            if r.ttft_s is not None]
    if rest:
        out["rest"] = statistics.median(rest)
    return out


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
    conc = settings.policy_concurrency
    policy_requests = {w: generate(workload(w, settings, conc), tokenizer) for w in workloads}
    result: dict[str, Any] = {"model": model, "settings": settings.__dict__, "load_before": os.getloadavg(),
                              "workloads": {w: {} for w in workloads}, "policies": {w: {} for w in workloads},
                              "configs": {}}

    def drive(arm: str, address: str, w: str, reqs: list, concurrency: int) -> dict[str, Any]:
        log(f"{arm}: {w} ({len(reqs)} requests, {concurrency} in flight)")
        before = cache_counters(address)
        (res,) = asyncio.run(run_sweep(address, reqs, [FixedConcurrency(concurrency)], SLO(1000.0, 200.0),
                                       timeout_s=300.0, replay_answers=settings.replay_answers))
        return summarize(res.records, before, cache_counters(address))

    # Logical CPUs: the routing arms run 3 workers of num_cpus 1 (only one arm is up at a time).
    start_ray("prefix-cache-bench", num_cpus=3 if settings.policies else 2)
    try:
        arms = ARMS + (POLICY_ARMS if settings.policies else ())
        for arm in arms:
            cfg = arm_config(arm, settings, model, f"prefix-cache-{os.getpid()}")
            result["configs"][arm] = cfg
            with running(parse_config(cfg, source=f"<arm {arm}>")) as (_, address):
                for w in workloads:
                    if arm in ARMS:
                        result["workloads"][w][arm] = drive(arm, address, w, requests[w], 1)
                    else:
                        result["policies"][w][arm] = drive(arm, address, w, policy_requests[w], conc)
    finally:
        import ray

        ray.shutdown()
    for w, arms in result["workloads"].items():
        off, on = arms["off"], arms["on"]
        arms["ttft_p50_reduction"] = reduction(off["ttft_p50_ms"], on["ttft_p50_ms"])
        arms["ttft_p50_turns_2_5_reduction"] = reduction(off["ttft_p50_turns_2_5_ms"], on["ttft_p50_turns_2_5_ms"])
        if off["transfer_bytes_mean"] is not None and on["transfer_bytes_mean"] is not None:
            arms["transfer_bytes_saved_mean"] = off["transfer_bytes_mean"] - on["transfer_bytes_mean"]
    for w, arms in result["policies"].items():
        if all(a in arms for a in POLICY_ARMS):
            arms["ttft_p50_reduction"] = reduction(arms["least_loaded"]["ttft_p50_ms"],
                                                   arms["prefix_aware"]["ttft_p50_ms"])
    result["load_after"] = os.getloadavg()
    return result


def _f(x, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def _stages(s: dict[str, Any]) -> str:
    st = s.get("ttft_stages_p50_ms") or {}
    return " / ".join(_f(st.get(k)) for k in TTFT_STAGES + ("rest",))


def _shape(settings: dict[str, Any]) -> str:
    """The workloads' sizes, in words (``settings``: :class:`Settings` as a dict, as in the JSON)."""
    def span(pair) -> str:
        lo, hi = pair
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    return (f"Workloads: shared-prefix {settings['shared_prefix_requests']} requests on a "
            f"{settings['prefix_tokens']}-token prefix, {span(settings['output_tokens'])}-token answers; "
            f"multi-turn {settings['conversations']} conversations of {settings['turns']} turns, "
            f"{span(settings['turn_output'])}-token answers"
            + (", the served answers sent back." if settings.get("replay_answers") else ", stand-in answers."))


def render_markdown(result: dict[str, Any]) -> str:
    lines = [f"Model `{result['model']}`; load average before {tuple(round(x, 1) for x in result['load_before'])}, "
             f"after {tuple(round(x, 1) for x in result['load_after'])}.", "",
             "One request in flight; 1 prefill + 1 decode worker. TTFT stages: medians (ms) over turns 2-5 "
             "(multi-turn) or all requests, of queue / prefill queue / prefill / transfer / rest (the first "
             "token's way back).", "",
             _shape(result["settings"]), "",
             "| workload | arm | ok/n | TTFT p50 ms | TTFT p50 turns 2-5 ms | TTFT stages p50 ms | "
             "KV bytes moved / req | prefill cached tok / req | decode cached tok / req | paths | "
             "hit rate prefill / decode |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w, arms in result["workloads"].items():
        for arm in ARMS:
            if arm not in arms:
                continue
            s = arms[arm]
            lines.append(_row(w, arm, s, _stages(s)))
    lines.append("")
    for w, arms in result["workloads"].items():
        if "off" not in arms or "on" not in arms:
            continue
        lines.append(f"- `{w}`: TTFT p50 {_f(arms['ttft_p50_reduction'], '.0%')} lower with the cache"
                     + (f", turns 2-5 {_f(arms['ttft_p50_turns_2_5_reduction'], '.0%')} lower"
                        if arms["ttft_p50_turns_2_5_reduction"] is not None else "")
                     + f"; KV bytes saved per request {_f(arms.get('transfer_bytes_saved_mean'))}"
                     + f"; decode-side hit rate {_f(arms['on']['hit_rate'].get('decode'), '.0%')}.")
        by_turn = _by_turn(arms["off"], arms["on"])
        if by_turn:
            lines.append(f"- `{w}`: TTFT p50 by turn, off -> on: {by_turn}.")
    policies = {w: arms for w, arms in result.get("policies", {}).items() if arms}
    if policies:
        conc = result["settings"].get("policy_concurrency")
        lines += ["", f"Routing: caching and conditional disaggregation on, 1 prefill + 2 decode workers, "
                      f"{conc} requests in flight (multi-turn: {conc} conversations).", "",
                  "| workload | policy | ok/n | TTFT p50 ms | TTFT p50 turns 2-5 ms | requests per decode worker | "
                  "KV bytes moved / req | prefill cached tok / req | decode cached tok / req | paths | "
                  "hit rate prefill / decode |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for w, arms in policies.items():
            for arm in POLICY_ARMS:
                if arm in arms:
                    s = arms[arm]
                    spread = " / ".join(str(n) for n in s["decode_workers"].values()) or "-"
                    lines.append(_row(w, arm, s, spread))
        lines.append("")
        for w, arms in policies.items():
            if arms.get("ttft_p50_reduction") is not None:
                lines.append(f"- `{w}`: prefix_aware TTFT p50 {_lower_or_higher(arms['ttft_p50_reduction'])} than "
                             "least_loaded.")
    return "\n".join(lines) + "\n"


def _lower_or_higher(red: float) -> str:
    """A reduction (0.2 = 20 % lower) in words: ``"20% lower"`` or, when negative, ``"20% higher"``."""
    return f"{red:.0%} lower" if red >= 0 else f"{-red:.0%} higher"


def _by_turn(off: dict[str, Any], on: dict[str, Any]) -> str:
    """``turn 1 a -> b ms (-x%), ...`` for the turns both arms have (JSON keys may be strings)."""
    off_t = {int(k): v for k, v in (off.get("ttft_p50_by_turn_ms") or {}).items()}
    on_t = {int(k): v for k, v in (on.get("ttft_p50_by_turn_ms") or {}).items()}
    parts = []
    for t in sorted(set(off_t) & set(on_t)):
        change = on_t[t] / off_t[t] - 1.0 if off_t[t] and on_t[t] is not None else None
        parts.append(f"turn {t} {_f(off_t[t])} -> {_f(on_t[t])} ms ({_f(change, '+.0%')})")
    return ", ".join(parts)


def _row(w: str, arm: str, s: dict[str, Any], extra: str) -> str:
    hr = s["hit_rate"]
    paths = ", ".join(f"{k or '?'} {v}" for k, v in s["paths"].items())
    return (f"| {w} | {arm} | {s['num_ok']}/{s['num_requests']} | {_f(s['ttft_p50_ms'])} | "
            f"{_f(s['ttft_p50_turns_2_5_ms'])} | {extra} | {_f(s['transfer_bytes_mean'])} | "
            f"{_f(s['prefill_cached_tokens_mean'])} | {_f(s['decode_cached_tokens_mean'])} | {paths} | "
            f"{_f(hr.get('prefill'), '.0%')} / {_f(hr.get('decode'), '.0%')} |")


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
    ap.add_argument("--no-policies", action="store_true", help="skip the least_loaded vs prefix_aware comparison")
    ap.add_argument("--synthetic-answers", action="store_true",
                    help="multi-turn: keep the workload's stand-in answers (exact lengths) instead of the served ones")
    ap.add_argument("--turn-output", type=range_arg, default=None, metavar="LO:HI",
                    help=f"multi-turn: answer lengths in tokens (default {FULL.turn_output[0]}:{FULL.turn_output[1]}; "
                         "16 is the shape measured before 2026-12-02 08:00)")
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    if any(w not in WORKLOADS for w in workloads):
        ap.error(f"--workloads: choose from {WORKLOADS}")
    settings = replace(QUICK if args.quick else FULL, policies=not args.no_policies,
                       replay_answers=not args.synthetic_answers)
    if args.turn_output is not None:
        settings = replace(settings, turn_output=args.turn_output)
    result = run(settings, workloads, args.model)
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
