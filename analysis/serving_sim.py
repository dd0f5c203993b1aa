"""A discrete-event simulation of a disaggregated deployment: router, prefill pool, KV transfer, decode pool.

Torch- and Ray-free, deterministic for a seed. It follows the path of
docs/architecture.md "Request lifecycle":

1. a request arrives (Poisson at ``rate``); the router reserves a slot on the
   decode worker with the most room (fewest running + reserved); with no room
   anywhere it waits in the router's queue, first come first served;
2. it joins the prefill worker with the fewest queued tokens; an idle prefill
   worker packs queued prompts up to ``max_batched_tokens`` into one step;
3. the KV moves to its decode worker (``transfer_s``); the first token leaves
   the router then (TTFT);
4. the decode worker runs continuous batching: each step adds the requests
   that arrived since, produces one token for every running request, and
   finishes those that reached their length (TPOT: the mean gap after the
   first token); the freed slot goes to the next request the router holds.

Step times come from a :class:`StepCosts` (the roofline of :mod:`analysis.cost_model`
on a hardware profile, scaled by an efficiency and a fixed overhead per step).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from analysis.cost_model import ModelDims, dtype_bytes, roofline_seconds
from analysis.hardware import HardwareProfile


@dataclass(frozen=True)
class StepCosts:
    """Seconds of one engine step on one worker (a device, or a tensor-parallel group of ``devices``).

    ``efficiency``: the share of the roofline real kernels reach; ``overhead_s``: fixed per step
    (scheduling, launch, sampling). ``link_bytes_per_s``/``link_latency_s``: the KV transfer path.
    """

    dims: ModelDims
    hardware: HardwareProfile
    dtype: str = "bf16"
    devices: int = 1
    efficiency: float = 0.5
    overhead_s: float = 0.002
    link_bytes_per_s: float = 50e9
    link_latency_s: float = 0.0005

    def _seconds(self, nbytes: float, flops: float) -> float:
        peaks = self.hardware.peaks(self.dtype)
        s, _ = roofline_seconds(nbytes, flops, peaks.bandwidth_bytes_per_s * self.devices,
                                peaks.flops_per_s * self.devices)
        return s / self.efficiency + self.overhead_s

    def prefill_s(self, prompt_lens: list[int]) -> float:
        return self._seconds(*self.dims.prefill(prompt_lens, dtype_bytes(self.dtype)))

    def decode_s(self, batch: int, mean_context: float) -> float:
        return self._seconds(*self.dims.decode_step(batch, mean_context, dtype_bytes(self.dtype)))

    def transfer_s(self, prompt_tokens: int) -> float:
        return self.link_latency_s + prompt_tokens * self.dims.kv_bytes_per_token(dtype_bytes(self.dtype)) / \
            self.link_bytes_per_s

    def max_batch(self, context_len: int, cap: int) -> int:
        """Sequences of ``context_len`` tokens whose KV fits next to the weights (at most ``cap``)."""
        free = self.hardware.memory_bytes * self.devices * 0.9 - self.dims.param_bytes(dtype_bytes(self.dtype))
        per_seq = context_len * self.dims.kv_bytes_per_token(dtype_bytes(self.dtype))
        return max(0, min(cap, int(free // per_seq)))


@dataclass(frozen=True)
class Workload:
    """Requests: Poisson arrivals at ``rate``/s, prompt and output lengths drawn uniformly from the ranges."""

    rate: float
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    requests: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


@dataclass(frozen=True)
class SimResult:
    prefill: int
    decode: int
    ttft_s: tuple[float, float, float]  # p50, p90, p99
    tpot_s: tuple[float, float, float]
    attainment: float  # both targets met
    ttft_attainment: float
    tpot_attainment: float
    throughput: float  # finished requests / s of simulated time


@dataclass
class _Req:
    arrival: float
    prompt: int
    output: int
    decode: int = -1
    first: float = 0.0
    done: float = 0.0
    made: int = 0  # tokens the decode worker produced


@dataclass
class _Decode:
    running: list = field(default_factory=list)
    joining: list = field(default_factory=list)
    reserved: int = 0
    busy: bool = False


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def simulate(costs: StepCosts, wl: Workload, slo: SLO, prefill: int, decode: int, *, max_batched_tokens: int = 8192,
             max_running: int = 256, samples: dict[str, list[float]] | None = None) -> SimResult:
    """Run ``wl`` through ``prefill`` + ``decode`` workers; latencies and attainment of every request.

    ``costs``: a :class:`StepCosts` or anything with its four methods and ``devices`` (e.g.
    :class:`analysis.calibration.MeasuredCosts`). ``samples``, when given, receives every request's
    ``ttft_s`` and ``tpot_s`` (in arrival order), to pool several runs."""
    rng = random.Random(wl.seed)
    t, reqs = 0.0, []
    for _ in range(wl.requests):
        t += rng.expovariate(wl.rate)
        reqs.append(_Req(t, rng.randint(*wl.input_len), rng.randint(*wl.output_len)))
    slots = costs.max_batch(wl.input_len[1] + wl.output_len[1], max_running)
    if slots < 1:
        raise ValueError("one request's KV does not fit next to the weights: more devices per worker")
    events: list = []
    seq = 0

    def push(at: float, kind: str, payload) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, payload))

    for r in reqs:
        push(r.arrival, "arrive", r)
    pq: list[deque] = [deque() for _ in range(prefill)]
    p_tokens = [0] * prefill
    p_busy = [False] * prefill
    dw = [_Decode() for _ in range(decode)]
    router: deque = deque()

    def admit(now: float, r: _Req) -> bool:
        d = min(range(decode), key=lambda i: len(dw[i].running) + dw[i].reserved)
        if len(dw[d].running) + dw[d].reserved >= slots:
            return False
        dw[d].reserved += 1
        r.decode = d
        p = min(range(prefill), key=lambda i: p_tokens[i])
        pq[p].append(r)
        p_tokens[p] += r.prompt
        start_prefill(now, p)
        return True

    def start_prefill(now: float, p: int) -> None:
        if p_busy[p] or not pq[p]:
            return
        batch, tokens = [], 0
        while pq[p] and (not batch or tokens + pq[p][0].prompt <= max_batched_tokens):
            r = pq[p].popleft()
            batch.append(r)
            tokens += r.prompt
        p_busy[p] = True
        push(now + costs.prefill_s([r.prompt for r in batch]), "prefilled", (p, batch, tokens))

    def start_decode(now: float, d: int) -> None:
        w = dw[d]
        if w.busy:
            return
        w.running += w.joining
        w.reserved -= len(w.joining)
        w.joining = []
        if not w.running:
            return
        w.busy = True
        ctx = sum(r.prompt + r.made for r in w.running) / len(w.running)
        push(now + costs.decode_s(len(w.running), ctx), "stepped", d)

    while events:
        now, _, kind, x = heapq.heappop(events)
        if kind == "arrive":
            if router or not admit(now, x):
                router.append(x)
        elif kind == "prefilled":
            p, batch, tokens = x
            p_busy[p] = False
            p_tokens[p] -= tokens
            for r in batch:
                push(now + costs.transfer_s(r.prompt), "landed", r)
            start_prefill(now, p)
        elif kind == "landed":
            x.first = now
            if x.output <= 1:
                x.done = now
                dw[x.decode].reserved -= 1
            else:
                dw[x.decode].joining.append(x)
                start_decode(now, x.decode)
        else:  # a decode step ended
            w = dw[x]
            w.busy = False
            still = []
            for r in w.running:
                r.made += 1
                if r.made >= r.output - 1:
                    r.done = now
                else:
                    still.append(r)
            freed = len(w.running) - len(still)
            w.running = still
            start_decode(now, x)
            while freed and router and admit(now, router[0]):
                router.popleft()
                freed -= 1
    ttft = [r.first - r.arrival for r in reqs]
    tpot = [(r.done - r.first) / (r.output - 1) if r.output > 1 else 0.0 for r in reqs]
    if samples is not None:
        samples["ttft_s"], samples["tpot_s"] = ttft, tpot
    ok_t = [a <= slo.ttft_s for a in ttft]
    ok_p = [b <= slo.tpot_s for b in tpot]
    span = max(r.done for r in reqs) - reqs[0].arrival
    return SimResult(prefill, decode, tuple(_pct(ttft, q) for q in (0.5, 0.9, 0.99)),  # type: ignore[arg-type]
                     tuple(_pct(tpot, q) for q in (0.5, 0.9, 0.99)),  # type: ignore[arg-type]
                     sum(a and b for a, b in zip(ok_t, ok_p)) / len(reqs), sum(ok_t) / len(reqs),
                     sum(ok_p) / len(reqs), len(reqs) / span if span > 0 else 0.0)
