"""Cluster overhead benchmark: the serving path against the bare engine, and KV transfer per backend.

Run from the repository root::

    python -m benchmarks.cluster_overhead [--json PATH] [--quick]

One process, one local Ray cluster (started here with ``ray.init(address="local")``
on 127.0.0.1 with token auth, and shut down at the end, also on error). TTFT
and TPOT are as defined in docs/architecture.md (Measurement); figures are
compared side by side in this one run and reported as ratios.

1. **Engine in-process vs cluster** (SmolLM2-135M-Instruct, float32, CPU).
   The same chat prompts (``max_tokens`` 32, ``ignore_eos``, greedy) run one
   at a time, interleaved, through
   (a) an :class:`~engine.llm_engine.LLMEngine` in this process: TTFT is from
       ``add_request`` (tokenization included) to the first ``step()`` that
       returns a token for the request; TPOT is the mean gap of the later
       tokens, ``(t_last - t_first) / (tokens - 1)``;
   (b) a 1:1 deployment (router in this process, prefill and decode workers as
       Ray actors, KV over gloo; ``benchmarks.deployments.make_config``),
       measured at a blocking gRPC client: TTFT from just before
       ``Client.stream`` to the first response that carries a token, TPOT as
       above. The router's own ``timings`` of the last response
       (``ttft_ms``, ``tpot_ms``, ``queue_ms``, ``prefill_ms``, ``transfer_ms``,
       ``transfer_bytes``) are recorded too.
   Ray runs each worker with the torch thread count of its ``num_cpus`` (one
   thread here); the in-process engine is measured at that same thread count
   ("matched", the basis of the ratios) and, where it differs, at torch's
   default too. One untimed warm-up request goes through each path first.
   Targets: cluster TPOT <= 1.15x engine TPOT, and cluster TTFT <= engine
   TTFT + transfer time (the router's ``transfer_ms``) + 15 ms (medians).

2. **KV transfer per backend.** The KV of a 128-, 512- and 2048-token prompt of
   SmolLM2 (``[30, 2, T, 3, 64]`` float32, T * 46080 bytes) moves through
   ``kvtransfer`` transports used directly (``make_transport``), with the
   cluster's default chunk size:
   - ``inproc`` (reference) and ``gloo`` / ``grpc`` with both ends in this
     process (threads);
   - ``gloo`` / ``grpc`` / ``ray`` with sender and receiver each in its own Ray
     actor process, as deployed (the ray backend needs its receiver in a named
     actor anyway);
   - ``shm`` (shared memory) in this process and across two actor processes,
     and ``gloo+shm``: what a deployment with the default
     ``kvtransfer.same_node: shm`` holds (gloo for other nodes; this pair is on
     one node, so its KV goes through shared memory).
   Per transfer: the receiver ``expect``\\ s, then (after a 50 ms lead, about a
   prefill, so the receiver's polling has settled as it has in the cluster)
   the sender ``send``\\ s; both sides poll every 0.2 ms until SUCCESS. Time =
   from ``send`` until both sides report SUCCESS, taken with
   ``time.monotonic()`` (one system-wide clock, so valid across processes).
   One warm-up transfer per size (it also sets up the connection), then the
   median of N. The reference is a plain memory copy of the same bytes
   (``dst.copy_(src)`` on preallocated tensors, median of max(4N, 10), this
   process's torch threads, sampled before Ray starts and again before the
   transfers, the faster sampling kept: the stricter reference); a copy into a freshly allocated ``dst`` each time
   (the receivers allocate their destination at ``expect``, so its pages fault
   in during the transfer) is shown next to it. Bandwidth everywhere is
   payload bytes / time (not read + write). Target: the fastest on-node
   backend moves KV at >= 50% of the memcpy bandwidth (judged per size on the
   cross-process figures; the in-process ones are shown alongside).

stdout gets the tables; progress goes to stderr. ``--json PATH`` writes one
object with exactly the keys ``engine``, ``cluster`` and ``transfer``.
``--quick`` runs 2 prompts once each and 2 timed transfers per size (the full
run: 4 prompts twice each, 5 transfers per size). ``--transfers-only`` skips
section 1 (no model, no deployment): memcpy and every backend side by side,
and the JSON holds only ``transfer``.

The machine is shared: the busy cores seen before the run are recorded, and
absolute times only mean something next to each other.

This module runs the measurements; medians, ratios, targets and the tables
are :mod:`benchmarks.cluster_overhead_report`.
"""

from __future__ import annotations

from cluster.local_ray import apply_ray_env

# Ray reads its environment when it is imported: token auth and loopback only, set before any import of ray.
apply_ray_env()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.cluster_overhead_report import (BUSY_WARN_CORES, KV_TOKENS, SERVER_FIELDS, Events,  # noqa: E402
                                                best_memcpy, judge_paths, judge_transfers, kv_nbytes, kv_shape,
                                                median, render, render_transfers, stream_timing, summarize)
from benchmarks.common import busy_cores, log  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_loader import DEFAULT_MODEL, load_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kvtransfer.base import Endpoint, KVTransport, TransferStatus  # noqa: E402
from kvtransfer.chunking import DEFAULT_CHUNK_BYTES  # noqa: E402
from kvtransfer.factory import make_transport  # noqa: E402
from kvtransfer.inproc import InProcHub  # noqa: E402
from kvtransfer.ray_transport import KVTransferActorMixin  # noqa: E402
from kvtransfer.shm_settings import DEFAULT_SHM_POOL_BYTES  # noqa: E402
from router.client import Client  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
    "Why do leaves change color in autumn?",
]
MAX_TOKENS = 32
ENGINE_NUM_BLOCKS = 512  # the decode pool's num_blocks in make_config

TRANSFER_TIMEOUT_S = 60.0
EXPECT_LEAD_S = 0.05   # expect -> send gap, about one prefill, as in the cluster
POLL_S = 0.0002        # how often this benchmark polls a transfer's status
RAY_NAMESPACE = "bench-cluster-overhead"
ACTOR_START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Settings:
    """How much work one run does (``--quick`` shrinks it)."""

    prompts: int
    rounds: int          # times each prompt goes through each path
    transfer_reps: int   # timed transfers (and memcpys) per size, after one warm-up


FULL = Settings(prompts=4, rounds=2, transfer_reps=5)
QUICK = Settings(prompts=2, rounds=1, transfer_reps=2)


# ------------------------------------------------------------------------ ray
def start_ray() -> None:
    """A fresh local Ray cluster owned by this process (:func:`benchmarks.common.start_ray`)."""
    common.start_ray(RAY_NAMESPACE, num_cpus=2)


@ray.remote(num_cpus=0.5)
def _worker_threads() -> dict[str, Any]:
    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def worker_threads(num_cpus: float) -> dict[str, Any]:
    """Torch threads of a Ray worker with ``num_cpus`` (what the pools' actors get)."""
    return ray.get(_worker_threads.options(num_cpus=num_cpus).remote(), timeout=ACTOR_START_TIMEOUT_S)


# ---------------------------------------------------------------- one request
def engine_request(eng: LLMEngine, rid: str, question: str) -> tuple[dict[str, Any], list[int]]:
    """One request alone through the in-process engine; its timing and token ids."""
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0)
    events: Events = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    eng.add_request(rid, params=params, messages=[{"role": "user", "content": question}])
    while eng.has_unfinished():
        outs = eng.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id == rid and out.new_token_ids:
                events.append((now, len(out.new_token_ids)))
                tokens += out.new_token_ids
    return stream_timing(t0, events), tokens


def cluster_request(client: Client, question: str) -> tuple[dict[str, Any], list[int]]:
    """One request alone through the router, timed at the client; plus the router's timings."""
    events: Events = []
    tokens: list[int] = []
    server: dict[str, Any] = {}
    t0 = time.perf_counter()
    for resp in client.stream(messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
                              ignore_eos=True, temperature=0.0):
        now = time.perf_counter()
        if resp.token_ids:
            events.append((now, len(resp.token_ids)))
            tokens += list(resp.token_ids)
        if resp.finish_reason:
            server = {k: getattr(resp.timings, k) for k in SERVER_FIELDS}
            server["other_ms"] = server["ttft_ms"] - server["queue_ms"] - server["prefill_ms"] - server["transfer_ms"]
    return {**stream_timing(t0, events), "server": server}, tokens


# ------------------------------------------------------ engine vs the cluster
@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare_paths(settings: Settings, default_threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Section 1: the same prompts through the engine in-process and through a 1:1 deployment."""
    from benchmarks.deployments import make_config, running

    cfg = make_config(DEFAULT_MODEL, backend="gloo")
    threads = worker_threads(cfg.pools.decode.num_cpus)
    matched = int(threads["torch_threads"])
    log(f"pool workers run torch with {matched} thread(s) ({threads}); this process defaults to {default_threads}")
    log("loading the model in-process")
    eng = LLMEngine(load_model(DEFAULT_MODEL), num_blocks=ENGINE_NUM_BLOCKS)
    thread_counts = [matched] + ([default_threads] if default_threads != matched else [])
    engine_runs: dict[int, list[dict[str, Any]]] = {n: [] for n in thread_counts}
    cluster_runs: list[dict[str, Any]] = []
    same_tokens = 0
    log("starting the deployment (router here, 1 prefill + 1 decode actor, KV over gloo)")
    with running(cfg) as (_d, address):
        client = Client(address, timeout_s=120)
        try:
            client.wait_ready(120)
            for n in thread_counts:  # warm-ups, untimed
                with torch_threads(n):
                    engine_request(eng, f"warm-{n}", PROMPTS[0])
            cluster_request(client, PROMPTS[0])
            questions = PROMPTS[:settings.prompts]
            for rnd in range(settings.rounds):
                for i, q in enumerate(questions):
                    ref: list[int] = []
                    for n in thread_counts:
                        with torch_threads(n):
                            timing, ref = engine_request(eng, f"r{rnd}-p{i}-t{n}", q)
                        engine_runs[n].append(timing)
                    timing, toks = cluster_request(client, q)
                    cluster_runs.append(timing)
                    same_tokens += toks == ref
                    log(f"round {rnd} prompt {i}: engine TTFT {engine_runs[matched][-1]['ttft_ms']:.1f} ms "
                        f"TPOT {engine_runs[matched][-1]['tpot_ms']:.1f} ms | cluster TTFT {timing['ttft_ms']:.1f} ms "
                        f"TPOT {timing['tpot_ms']:.1f} ms (transfer {timing['server']['transfer_ms']:.1f} ms)")
        finally:
            client.close()
    engine = {
        "torch_threads": matched, "default_torch_threads": default_threads, "worker_threads": threads,
        "max_tokens": MAX_TOKENS, "prompts": questions,
        "matched": summarize(engine_runs[matched]), "runs": engine_runs[matched],
    }
    if default_threads != matched:
        engine["default_threads"] = {**summarize(engine_runs[default_threads]), "runs": engine_runs[default_threads]}
    cluster = {"deployment": "1:1 builtin:smollm2-135m-instruct, kvtransfer gloo, router in this process",
               **summarize(cluster_runs), "runs": cluster_runs,
               "same_tokens_as_engine": f"{same_tokens}/{len(cluster_runs)}"}
    cluster.update(judge_paths(engine["matched"], cluster))
    return engine, cluster


# -------------------------------------------------------------- KV transfers
def wait_success(tr: KVTransport, tid: str, timeout_s: float) -> float:
    """Poll until ``tid`` is done; the ``time.monotonic()`` of SUCCESS (raises if it failed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = tr.poll(tid)
        if status.done:
            now = time.monotonic()
            if status != TransferStatus.SUCCESS:
                raise RuntimeError(f"transfer {tid} {status.name}: {tr.error(tid)}")
            return now
        if time.monotonic() > deadline:
            tr.abort(tid)
            raise TimeoutError(f"transfer {tid} not done in {timeout_s} s")
        time.sleep(POLL_S)


class KVHost(KVTransferActorMixin):
    """One transport and what a benchmark needs of it; used as is, or as a Ray actor (``RemoteKVHost``)."""

    def __init__(self) -> None:
        self.kv_transport: KVTransport | None = None
        self._payloads: dict[int, torch.Tensor] = {}

    def open(self, backend: str, worker_id: str, kwargs: dict[str, Any]) -> Endpoint:
        self.close()
        self.kv_transport = make_transport(backend.removesuffix("+shm"), worker_id, **kwargs)
        return self.kv_transport.endpoint()

    def expect(self, tid: str, tokens: int, peer: Endpoint, timeout_s: float) -> None:
        assert self.kv_transport is not None
        self.kv_transport.expect(tid, kv_shape(tokens), torch.float32, peer, timeout_s)

    def wait_recv(self, tid: str, timeout_s: float) -> float:
        """Block until the expected ``tid`` arrived; when (monotonic). Drops the data."""
        assert self.kv_transport is not None
        t_done = wait_success(self.kv_transport, tid, timeout_s)
        self.kv_transport.result(tid)
        return t_done

    def send_and_wait(self, tid: str, tokens: int, peer: Endpoint, timeout_s: float) -> tuple[float, float]:
        """Send a (cached) KV of ``tokens`` tokens; (start, sender SUCCESS) in monotonic time."""
        assert self.kv_transport is not None
        if tokens not in self._payloads:
            self._payloads[tokens] = torch.randn(kv_shape(tokens))
        t_start = time.monotonic()
        self.kv_transport.send(tid, self._payloads[tokens], peer, timeout_s)
        t_done = wait_success(self.kv_transport, tid, timeout_s)
        self.kv_transport.forget(tid)
        return t_start, t_done

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self.kv_transport is not None:
            self.kv_transport.close()
            self.kv_transport = None


RemoteKVHost = ray.remote(num_cpus=0, max_concurrency=8)(KVHost)
Call = Callable[..., Future]  # call(method, *args) -> a future of its result


def local_call(host: KVHost, pool: ThreadPoolExecutor) -> Call:
    return lambda method, *args: pool.submit(getattr(host, method), *args)


def actor_call(handle: Any) -> Call:
    return lambda method, *args: getattr(handle, method).remote(*args).future()


def one_transfer(send: Call, recv: Call, send_ep: Endpoint, recv_ep: Endpoint, tid: str,
                 tokens: int) -> dict[str, float]:
    """expect, a lead, send; ms until both sides are SUCCESS (and until the receiver is)."""
    recv("expect", tid, tokens, send_ep, TRANSFER_TIMEOUT_S).result(TRANSFER_TIMEOUT_S)
    time.sleep(EXPECT_LEAD_S)
    got = recv("wait_recv", tid, TRANSFER_TIMEOUT_S)
    sent = send("send_and_wait", tid, tokens, recv_ep, TRANSFER_TIMEOUT_S)
    t_start, t_sent = sent.result(TRANSFER_TIMEOUT_S + 10)
    t_recv = got.result(TRANSFER_TIMEOUT_S + 10)
    return {"ms": (max(t_sent, t_recv) - t_start) * 1e3, "recv_ms": (t_recv - t_start) * 1e3}


def time_backend(name: str, send: Call, recv: Call, send_ep: Endpoint, recv_ep: Endpoint, reps: int,
                 memcpy: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Every KV size through one sender/receiver pair: warm-up, then the median of ``reps``."""
    sizes = {}
    for tokens in KV_TOKENS:
        one_transfer(send, recv, send_ep, recv_ep, f"{name}-{tokens}-warm", tokens)
        samples = [one_transfer(send, recv, send_ep, recv_ep, f"{name}-{tokens}-{i}", tokens) for i in range(reps)]
        ms = median([s["ms"] for s in samples])
        gbps = kv_nbytes(tokens) / (ms / 1e3) / 1e9
        sizes[str(tokens)] = {"tokens": tokens, "bytes": kv_nbytes(tokens), "ms": ms,
                              "recv_ms": median([s["recv_ms"] for s in samples]), "gbps": gbps,
                              "fraction_of_memcpy": gbps / memcpy[tokens]["gbps"],
                              "fraction_of_first_touch_memcpy": gbps / memcpy[tokens]["first_touch_gbps"],
                              "samples_ms": [s["ms"] for s in samples]}
        log(f"  {name:<14} {tokens:>5} tokens: {ms:8.2f} ms  {gbps:6.2f} GB/s  "
            f"({sizes[str(tokens)]['fraction_of_memcpy']:.0%} of memcpy)")
    return sizes


def time_copies(src: torch.Tensor, reps: int, fresh: bool) -> float:
    """Median ms of ``dst.copy_(src)``: into one preallocated ``dst``, or (``fresh``) a new one each time."""
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: fault the pages in
    samples = []
    for _ in range(max(4 * reps, 10)):  # cheap next to a transfer: more samples against the noise
        if fresh:
            del dst
            dst = torch.empty_like(src)  # untimed, like a receiver's expect(); its pages fault in during the copy
        t0 = time.perf_counter()
        dst.copy_(src)
        samples.append((time.perf_counter() - t0) * 1e3)
    return median(samples)


def measure_memcpy(reps: int) -> dict[int, dict[str, float]]:
    """Per KV size: ``dst.copy_(src)`` on preallocated tensors (the reference), and into a fresh ``dst``."""
    out = {}
    for tokens in KV_TOKENS:
        src, nbytes = torch.randn(kv_shape(tokens)), kv_nbytes(tokens)
        ms, fresh_ms = time_copies(src, reps, fresh=False), time_copies(src, reps, fresh=True)
        out[tokens] = {"tokens": tokens, "bytes": nbytes, "ms": ms, "gbps": nbytes / (ms / 1e3) / 1e9,
                       "first_touch_ms": fresh_ms, "first_touch_gbps": nbytes / (fresh_ms / 1e3) / 1e9}
        log(f"  {'memcpy':<14} {tokens:>5} tokens: {ms:8.2f} ms  {out[tokens]['gbps']:6.2f} GB/s "
            f"(into a fresh buffer: {fresh_ms:.2f} ms, {out[tokens]['first_touch_gbps']:.2f} GB/s)")
    return out


IN_PROCESS_BACKENDS = ("inproc", "gloo", "grpc", "shm")
CROSS_PROCESS_BACKENDS = ("gloo", "grpc", "ray", "shm", "gloo+shm")


def transport_kwargs(backend: str) -> dict[str, Any]:
    """What the cluster passes (worker_common.worker_config.HandoffSettings.transport_kwargs), for one process's transports.

    ``<backend>+shm``: ``backend`` with ``same_node: shm``, on this (the driver's) node, where the actors run too.
    """
    if backend == "ray":
        return {"namespace": RAY_NAMESPACE}
    kwargs: dict[str, Any] = {"host": "127.0.0.1", "chunk_bytes": DEFAULT_CHUNK_BYTES}
    if backend.endswith("+shm"):
        kwargs.update(same_node="shm", node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                      shm_pool_bytes=DEFAULT_SHM_POOL_BYTES)
    return kwargs


def in_process_pair(backend: str, reps: int, memcpy: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Sender and receiver in this process (threads)."""
    kwargs = {"hub": InProcHub()} if backend == "inproc" else transport_kwargs(backend)
    sender, receiver = KVHost(), KVHost()
    with ThreadPoolExecutor(4) as pool:
        try:
            s_ep = sender.open(backend, f"bench-{backend}-s", dict(kwargs))
            r_ep = receiver.open(backend, f"bench-{backend}-r", dict(kwargs))
            return time_backend(f"{backend}/threads", local_call(sender, pool), local_call(receiver, pool),
                                s_ep, r_ep, reps, memcpy)
        finally:
            sender.close()
            receiver.close()


def cross_process_pair(backend: str, hosts: list[Any], reps: int,
                       memcpy: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Sender and receiver each in its own actor process (the receiver's actor is named, for ``ray``)."""
    s, r = hosts
    try:
        s_ep = ray.get(s.open.remote(backend, f"bench-{backend}-s", transport_kwargs(backend)), timeout=60)
        r_ep = ray.get(r.open.remote(backend, f"bench-{backend}-r", transport_kwargs(backend)), timeout=60)
        return time_backend(f"{backend}/processes", actor_call(s), actor_call(r), s_ep, r_ep, reps, memcpy)
    finally:
        try:
            ray.get([s.close.remote(), r.close.remote()], timeout=60)
        except Exception as e:  # noqa: BLE001 - a dead host must not hide the figures or the first error
            log(f"  closing the {backend} transports failed: {type(e).__name__}: {e}")


def wait_for_quiet(max_wait_s: float = 20.0, quiet_cores: float = BUSY_WARN_CORES) -> float | None:
    """Wait (up to ``max_wait_s``) for the machine to settle, e.g. after the deployment's processes exit."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = busy_cores(1.0)
        if busy is None or busy <= quiet_cores or time.monotonic() > deadline:
            return busy
        log(f"waiting for the machine to settle ({busy} cores busy)")


def measure_transfers(settings: Settings, memcpy_at_start: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Section 2: every backend against memcpy, for every KV size."""
    reps = settings.transfer_reps
    busy = wait_for_quiet()
    log(f"memcpy reference ({torch.get_num_threads()} torch threads), second sampling; {busy} cores busy")
    memcpy = best_memcpy(memcpy_at_start, measure_memcpy(reps))
    results: dict[str, Any] = {}
    for backend in IN_PROCESS_BACKENDS:
        results[f"{backend}/threads"] = guarded(lambda b=backend: in_process_pair(b, reps, memcpy))
    hosts = [RemoteKVHost.options(name=f"bench-kvhost-{i}", namespace=RAY_NAMESPACE).remote() for i in range(2)]
    try:
        pids = ray.get([h.pid.remote() for h in hosts], timeout=ACTOR_START_TIMEOUT_S)
        log(f"transport actors up (pids {pids})")
        for backend in CROSS_PROCESS_BACKENDS:
            results[f"{backend}/processes"] = guarded(lambda b=backend: cross_process_pair(b, hosts, reps, memcpy))
    finally:
        for h in hosts:
            ray.kill(h)
    return {
        "kv_shape": ["layers=30", 2, "T", "kv_heads=3", "head_dim=64"], "dtype": "float32",
        "bytes_per_token": kv_nbytes(1), "chunk_bytes": DEFAULT_CHUNK_BYTES, "reps": reps,
        "expect_lead_ms": EXPECT_LEAD_S * 1e3, "poll_ms": POLL_S * 1e3, "torch_threads": torch.get_num_threads(),
        "memcpy": {str(k): v for k, v in memcpy.items()}, "backends": results,
        "target": judge_transfers(results, memcpy),
    }


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One backend's figures, or its error: a failing backend does not sink the others."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
        log(f"  FAILED: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and transfer repetitions")
    ap.add_argument("--transfers-only", action="store_true", help="only section 2: memcpy and the KV backends")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    t_start = time.monotonic()
    default_threads = torch.get_num_threads()
    busy = busy_cores()
    log(f"machine busy before the run: {busy} cores of {os.cpu_count()}")
    log(f"memcpy reference ({default_threads} torch threads), first sampling")
    memcpy_at_start = measure_memcpy(settings.transfer_reps)
    start_ray()
    try:
        if not args.transfers_only:
            engine, cluster = compare_paths(settings, default_threads)
        log("KV transfers")
        transfer = measure_transfers(settings, memcpy_at_start)
    finally:
        ray.shutdown()
    machine = {"cpu_count": os.cpu_count(), "busy_cores_before_run": busy, "torch": torch.__version__,
               "ray": ray.__version__, "quick": args.quick, "wall_s": round(time.monotonic() - t_start, 1)}
    if args.transfers_only:
        transfer["machine"] = machine
        print(render_transfers(transfer))
        if busy is not None and busy > BUSY_WARN_CORES:
            print(f"\nwarning: {busy} cores were busy with other work before the run; figures are noisy")
        report: dict[str, Any] = {"transfer": transfer}
    else:
        engine["machine"] = machine
        print(render(engine, cluster, transfer))
        report = {"engine": engine, "cluster": cluster, "transfer": transfer}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json}")
    log(f"done in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
