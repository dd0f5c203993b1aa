"""Arrival processes and the async driver that replays a workload against a
splitserve router over gRPC (or its OpenAI-compatible HTTP API,
``benchmarks.http_client``), recording when every token arrives.

1. An :class:`Arrival` says when each request may be sent: open-loop
   processes (:class:`Poisson`, :class:`ConstantRate`, :class:`Burst`) give a
   schedule of offsets from the run's start; :class:`FixedConcurrency` is
   closed-loop (C requests in flight; the next goes when one ends).
2. :func:`run_trace` sends each request at its time (and not before the
   request it ``depends_on`` has finished: the previous turn of a
   conversation), streams the answer, and returns one
   :class:`~benchmarks.slo.RequestRecord` per request, failures included (the
   gRPC status code name is kept; nothing is retried).
3. :func:`run_sweep` runs the same workload once per arrival (e.g. per rate)
   and summarizes each run.

All times come from one monotonic clock (``time.perf_counter``) and are
stored relative to the run's start.
"""

from __future__ import annotations

import asyncio
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from benchmarks.http_client import HTTPStatusError, OpenAIStreamClient
from benchmarks.slo import SLO, RequestRecord, summarize
from benchmarks.workloads import BenchRequest
from protos import serving_pb2
from router.client import FINISH_NAMES, AsyncClient

TIMING_FIELDS = ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms", "prefill_queue_ms", "prefill_ms", "transfer_ms",
                 "decode_queue_ms", "transfer_bytes", "prefill_cached_tokens", "decode_cached_tokens",
                 "transfer_bytes_saved")


class Arrival(ABC):
    """When requests are sent. Open-loop processes return a schedule; closed-loop ones ``None``."""

    @abstractmethod
    def schedule(self, n: int) -> list[float] | None:
        """Send offsets (seconds from the start, non-decreasing) for ``n`` requests, or ``None`` if closed-loop."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-ready parameters, with ``kind``."""

    @property
    def rate(self) -> float | None:
        """The offered rate in requests/s (``None`` when closed-loop)."""
        return None


@dataclass(frozen=True)
class Poisson(Arrival):
    """Poisson arrivals at ``rate`` req/s: exponential gaps from ``random.Random(seed)``; the first request at 0."""

    rate_rps: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate_rps <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate_rps}")

    def schedule(self, n: int) -> list[float]:
        rng = random.Random(self.seed)
        out, t = [], 0.0
        for i in range(n):
            if i:
                t += rng.expovariate(self.rate_rps)
            out.append(t)
        return out

    def describe(self) -> dict:
        return {"kind": "poisson", "rate": self.rate_rps, "seed": self.seed}

    @property
    def rate(self) -> float:
        return self.rate_rps


@dataclass(frozen=True)
class ConstantRate(Arrival):
    """Evenly spaced arrivals at ``rate`` req/s: request i at ``i / rate``."""

    rate_rps: float

    def __post_init__(self) -> None:
        if self.rate_rps <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate_rps}")

    def schedule(self, n: int) -> list[float]:
        return [i / self.rate_rps for i in range(n)]

    def describe(self) -> dict:
        return {"kind": "constant", "rate": self.rate_rps}

    @property
    def rate(self) -> float:
        return self.rate_rps


@dataclass(frozen=True)
class Burst(Arrival):
    """Bursts of ``size`` requests sent at once, one burst every ``interval_s``.

    ``size=None`` (or >= n) sends every request at time 0. The offered rate
    is ``size / interval_s``; :meth:`at_rate` keeps the size and sets the
    interval from a rate.
    """

    size: int | None = None
    interval_s: float = 0.0

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"burst size must be >= 1, got {self.size}")
        if self.interval_s < 0 or (self.size is not None and self.interval_s == 0):
            raise ValueError("bursts of a given size need an interval > 0")

    @classmethod
    def at_rate(cls, size: int, rate: float) -> Burst:
        """Bursts of ``size`` at an average ``rate`` req/s."""
        return cls(size, size / rate)

    def schedule(self, n: int) -> list[float]:
        if self.size is None:
            return [0.0] * n
        return [(i // self.size) * self.interval_s for i in range(n)]

    def describe(self) -> dict:
        return {"kind": "burst", "size": self.size, "interval_s": self.interval_s, "rate": self.rate}

    @property
    def rate(self) -> float | None:
        return None if self.size is None else self.size / self.interval_s


@dataclass(frozen=True)
class Scheduled(Arrival):
    """Open loop with explicit send offsets (a trace built elsewhere: merged or phased schedules)."""

    times: tuple[float, ...]

    def schedule(self, n: int) -> list[float]:
        if n != len(self.times):
            raise ValueError(f"schedule of {len(self.times)} sends for {n} requests")
        return list(self.times)

    def describe(self) -> dict:
        return {"kind": "scheduled", "n": len(self.times), "last_s": self.times[-1] if self.times else 0.0}


@dataclass(frozen=True)
class FixedConcurrency(Arrival):
    """Closed loop: ``concurrency`` requests in flight, in workload order."""

    concurrency: int

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    def schedule(self, n: int) -> None:
        return None

    def describe(self) -> dict:
        return {"kind": "concurrency", "concurrency": self.concurrency}


@dataclass
class RunResult:
    """One run of a sweep: its arrival, records and summary. ``x`` is the sweep
    variable for goodput: the offered rate, or for closed-loop runs the
    achieved request rate."""

    label: str
    arrival: dict
    x: float
    records: list[RequestRecord]
    summary: dict = field(default_factory=dict)

    def to_dict(self, with_records: bool = True) -> dict:
        d = {"label": self.label, "arrival": self.arrival, "x": self.x, "summary": self.summary}
        if with_records:
            d["records"] = [r.to_dict() for r in self.records]
        return d


APIS = ("grpc", "http")


def make_client(address: str, timeout_s: float, tls_ca: str | None = None, token: str | None = None,
                api: str = "grpc") -> AsyncClient | OpenAIStreamClient:
    """An ``AsyncClient`` (``api="grpc"``, ``address`` host:port) or an
    :class:`OpenAIStreamClient` (``api="http"``, ``address`` the ``.../v1`` base URL).
    ``tls_ca``/``token`` are passed only when given, so this works with
    client versions that lack them (then it says so)."""
    if api == "http":
        return OpenAIStreamClient(address, timeout_s, tls_ca=tls_ca, token=token)
    if api != "grpc":
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    extra = {k: v for k, v in (("tls_ca", tls_ca), ("token", token)) if v is not None}
    try:
        return AsyncClient(address, timeout_s, **extra)
    except TypeError as e:
        raise RuntimeError(f"this router.client.AsyncClient does not accept {sorted(extra)}: {e}") from e


def _messages_with_answers(req: BenchRequest, answers: list[str]) -> list[dict]:
    """``req``'s messages with the assistant turns replaced by the served ``answers`` (oldest first)."""
    out, k = [], 0
    for m in req.messages or ():
        m = dict(m)
        if m["role"] == "assistant" and k < len(answers):
            m["content"], k = answers[k], k + 1
        out.append(m)
    return out


async def run_trace(address: str | None, requests: Sequence[BenchRequest], arrival: Arrival, *,
                    client: AsyncClient | None = None, timeout_s: float = 600.0, tls_ca: str | None = None,
                    token: str | None = None, temperature: float | None = None, replay_answers: bool = False,
                    request_id_prefix: str = "bench",
                    on_done: Callable[[RequestRecord], None] | None = None) -> list[RequestRecord]:
    """Send ``requests`` as ``arrival`` says and record each one (in ``requests`` order).

    Each request asks for exactly ``output_tokens`` (``max_tokens`` with
    ``ignore_eos``). A request with ``depends_on`` waits for that request to
    end; with ``replay_answers`` its assistant turns are replaced by the text
    the server actually returned (then its input length is no longer exact;
    the server's ``usage.prompt_tokens`` is recorded either way). ``client``
    (e.g. shared over a sweep) overrides ``address``/``tls_ca``/``token``;
    ``on_done`` is called as each request ends (a progress bar).
    """
    own = client is None
    if own:
        client = make_client(address, timeout_s, tls_ca, token)
    n = len(requests)
    records = [RequestRecord(index=r.index, request_id=f"{request_id_prefix}-{i}", kind=r.kind,
                             input_tokens=r.input_tokens, output_tokens=r.output_tokens,
                             conversation=r.conversation, turn=r.turn) for i, r in enumerate(requests)]
    by_index = {r.index: i for i, r in enumerate(requests)}
    done = [asyncio.Event() for _ in range(n)]
    texts: list[str] = [""] * n
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        req, rec = requests[i], records[i]
        try:
            dep = by_index.get(req.depends_on) if req.depends_on is not None else None
            if dep is not None:
                await done[dep].wait()
            rec.ready_s = max(rec.scheduled_s, time.perf_counter() - t0)
            kw = req.send_kwargs()
            if replay_answers and req.messages is not None:
                answers, j = [], dep
                while j is not None:  # walk back the chain of earlier turns
                    answers.append(texts[j])
                    j = by_index.get(requests[j].depends_on) if requests[j].depends_on is not None else None
                kw = {"messages": _messages_with_answers(req, answers[::-1])}
            if temperature is not None:
                kw["temperature"] = temperature
            parts: list[str] = []
            rec.start_s = time.perf_counter() - t0
            async for resp in client.stream(max_tokens=req.output_tokens, ignore_eos=True,
                                            request_id=rec.request_id, **kw):
                now = time.perf_counter() - t0
                if resp.token_ids:
                    rec.token_times_s.append(now)
                    rec.token_counts.append(len(resp.token_ids))
                parts.append(resp.text)
                if resp.finish_reason != serving_pb2.FINISH_REASON_UNSPECIFIED:
                    rec.finish_reason = FINISH_NAMES[resp.finish_reason]
                    rec.prompt_tokens = resp.usage.prompt_tokens
                    rec.completion_tokens = resp.usage.completion_tokens
                    rec.server = {k: float(getattr(resp.timings, k)) for k in TIMING_FIELDS}
                    rec.path = resp.timings.path
                    rec.decode_worker = resp.timings.decode_worker
            rec.end_s = time.perf_counter() - t0
            texts[i] = "".join(parts)
        except grpc.aio.AioRpcError as e:
            rec.end_s = time.perf_counter() - t0
            rec.status, rec.error = e.code().name, e.details() or ""
        except HTTPStatusError as e:
            rec.end_s = time.perf_counter() - t0
            rec.status, rec.error = e.code_name, e.message
        except asyncio.CancelledError:
            rec.status, rec.error = "CANCELLED", "cancelled by the load generator"
            raise
        except Exception as e:  # a client-side failure is a result too, never a crash of the run
            rec.end_s = time.perf_counter() - t0
            rec.status, rec.error = "CLIENT_ERROR", f"{type(e).__name__}: {e}"
        finally:
            done[i].set()
            if on_done is not None:
                on_done(rec)

    try:
        times = arrival.schedule(n)
        if times is None:
            if not isinstance(arrival, FixedConcurrency):
                raise TypeError(f"closed-loop arrival {arrival!r} is not supported")
            concurrency = arrival.concurrency
            next_i = iter(range(n))

            async def worker() -> None:
                for i in next_i:  # shared iterator: each worker takes the next request in order
                    records[i].scheduled_s = time.perf_counter() - t0
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        else:
            tasks = []
            for i, t in enumerate(times):
                records[i].scheduled_s = t
                delay = t0 + t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
    finally:
        if own:
            await client.close()
    return records


async def warm_up(client: AsyncClient, requests: Sequence[BenchRequest], n: int) -> None:
    """Send the first ``n`` requests one by one, unrecorded (compiles, caches, connections)."""
    for i, req in enumerate(requests[:n]):
        async for _ in client.stream(max_tokens=req.output_tokens, ignore_eos=True, request_id=f"warmup-{i}-{time.time_ns()}",
                                     **req.send_kwargs()):
            pass


async def run_sweep(address: str, requests: Sequence[BenchRequest], arrivals: Sequence[Arrival], slo: SLO, *,
                    timeout_s: float = 600.0, tls_ca: str | None = None, token: str | None = None,
                    temperature: float | None = None, replay_answers: bool = False, warmup: int = 0, api: str = "grpc",
                    progress: Callable[[int, Arrival], Callable[[RequestRecord], None] | None] | None = None,
                    on_run: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Run the workload once per arrival, in order, on one connection, and summarize each run.

    ``warmup`` requests (the workload's first ones, unrecorded) go first.
    ``api``: ``"grpc"`` (``address`` host:port) or ``"http"`` (``address`` the OpenAI API's base URL).
    ``progress(run_index, arrival)`` may return an ``on_done`` callback for
    that run; ``on_run`` is called with each finished :class:`RunResult`.
    """
    client = make_client(address, timeout_s, tls_ca, token, api)
    results = []
    try:
        if warmup:
            await warm_up(client, requests, warmup)
        for k, arrival in enumerate(arrivals):
            on_done = progress(k, arrival) if progress else None
            records = await run_trace(None, requests, arrival, client=client, temperature=temperature,
                                      replay_answers=replay_answers, request_id_prefix=f"bench-{time.time_ns()}-{k}",
                                      on_done=on_done)
            summary = summarize(records, slo)
            x = arrival.rate if arrival.rate is not None else summary["request_throughput"]
            res = RunResult(label=_label(arrival), arrival=arrival.describe(), x=x, records=records, summary=summary)
            results.append(res)
            if on_run:
                on_run(res)
    finally:
        await client.close()
    return results


def _label(arrival: Arrival) -> str:
    d = arrival.describe()
    if d["kind"] == "concurrency":
        return f"concurrency {d['concurrency']}"
    if d["kind"] == "burst" and d["size"] is None:
        return "burst (all at once)"
    return f"{d['kind']} {arrival.rate:g} req/s"


def with_rate(arrival: Arrival, rate: float) -> Arrival:
    """The same kind of open-loop arrival at another ``rate`` (bursts keep their size)."""
    if isinstance(arrival, (Poisson, ConstantRate)):
        return replace(arrival, rate_rps=rate)
    if isinstance(arrival, Burst) and arrival.size is not None:
        return Burst.at_rate(arrival.size, rate)
    raise ValueError(f"{arrival.describe()['kind']} arrivals have no rate to set")
