"""Soak: mixed traffic, client cancels, and kills of a worker, a router replica and the pool
manager against a real local cluster.

Run from the repository root::

    python -m benchmarks.soak [--quick] [--duration-s 180] [--kill decode|prefill] [--routers 2] [--json PATH]

One process, one local Ray cluster (2 CPUs on 127.0.0.1, started and shut
down here with :func:`benchmarks.common.start_ray`), one disaggregated
deployment (default 2 prefill + 2 decode workers on ``builtin:tiny-llama``,
KV over gloo, ``--routers`` 2 router replica actors sharing one port). For
``--duration-s`` seconds (``--quick``: 60) the driver sends a seeded mix of
requests over ``--connections`` channels (the kernel hands each connection
to one router replica), at most ``--concurrency`` in flight:

- raw prompts and chat requests of random prompt and output lengths
  (``ignore_eos``), greedy or sampled;
- a few invalid ones (``max_tokens`` 0, negative temperature, empty chat,
  unknown role, a prompt longer than the model...), which must be refused
  with INVALID_ARGUMENT;
- a fraction cancelled by the client (``call.cancel()``) at a random time;
- a fraction with a gRPC deadline (some too short to finish);
- every 10 s (from 5 s on) a burst (``--burst``, 28) which, with what is in flight,
  passes ``router.max_queued`` (``--max-queued``, 24): some are refused with
  RESOURCE_EXHAUSTED.

Like :mod:`router.client`, the driver sends a call again when it fails with
UNAVAILABLE before any response (``client_retries``).

At a third of the run one worker of the ``--kill`` kind is SIGKILLed (its pid
from the actor's ``pid()``); the router retries or resumes its requests and
the pool manager replaces it. At half the run the router replica carrying the
most requests is SIGKILLed (unless ``--no-kill-router``, or ``--routers 1``,
where the router runs in this process): only the streams it carried and that
had already answered end (UNAVAILABLE, counted as failed); the others are
retried on the live replicas, and Ray restarts it (``router_kill``). At two
thirds the pool manager itself is SIGKILLed (unless ``--no-kill-manager``):
the routers keep routing with the workers they know, Ray restarts the manager
and it adopts them (reported under ``manager_kill``). Then traffic stops,
every request ends, and the benchmark waits (at most ``--settle-s``) for
every worker's KV blocks to be free.

Each request ends in exactly one class:

- **completed**: the stream ended with a ``finish_reason``;
- **cancelled**: this client cancelled it before it finished;
- **failed**: it ended with a gRPC error status (a clear one: counted by code);
- **lost**: neither, within its deadline + ``--margin-s`` (a request with no
  deadline gets ``--hang-s``): it hung, or its stream ended with neither a
  ``finish_reason`` nor an error. Must be 0.

Also reported: **leaked blocks** (after the settle, the blocks in use on
every worker in ClusterStatus, replacements included: ``max(used_blocks,
num_blocks - free_blocks)`` summed; must be 0) and the **RSS growth** (MB,
``VmRSS`` of ``/proc/<pid>/status``) of this process (the client, and the
router with ``--routers 1``), of each router replica and of every worker
actor, from just after the warm-up to the end (a replacement from when it
joined; a killed process is reported as replaced). stdout gets the summary,
progress goes to stderr. ``--json PATH`` writes one object with at least the
keys ``completed``, ``failed``, ``lost``, ``leaked_blocks`` and
``rss_growth_mb``. The exit status is 1 when anything was lost or leaked (or
a kill could not be done or its victim did not come back), else 0.

This module runs the soak; the accounting and the report are
:mod:`benchmarks.soak_report`.
"""

from __future__ import annotations

from cluster.local_ray import apply_ray_env

# Ray reads its environment when it is imported: token auth and loopback only, set before any import of ray.
apply_ray_env()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.soak_report import (  # noqa: E402
    ProcSample,
    Record,
    build_report,
    classify,
    exit_code,
    leaked_blocks,
    leaked_by_worker,
    render,
    worker_blocks,
)
from worker_common.timeouts import within  # noqa: E402

INVALID_KINDS = ("max_tokens_zero", "negative_temperature", "top_p_too_big", "negative_top_k", "empty_chat",
                 "bad_role", "no_input", "prompt_too_long")
MB = 1024 * 1024
RAY_NAMESPACE = "bench-soak"


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- RSS
def rss_mb(pid: int) -> float | None:
    """``VmRSS`` of ``pid`` in MB, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MB  # the value is in kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


# ------------------------------------------------------------------ traffic
@dataclass(frozen=True)
class Settings:
    duration_s: float
    concurrency: int = 32
    rate_rps: float = 6.0          # mean arrival rate between bursts
    burst_every_s: float = 10.0
    burst_size: int = 28           # more than router.max_queued at once: some RESOURCE_EXHAUSTED
    prompt_tokens: tuple[int, int] = (4, 320)
    output_tokens: tuple[int, int] = (1, 128)
    chat_frac: float = 0.45
    invalid_frac: float = 0.04
    cancel_frac: float = 0.12
    cancel_window_s: tuple[float, float] = (0.0, 1.0)  # requests take ~0.1-2 s on tiny-llama
    deadline_frac: float = 0.2
    deadline_s: tuple[float, float] = (0.05, 8.0)      # the shortest ones expire
    sampled_frac: float = 0.3
    margin_s: float = 30.0         # lost = not ended by deadline + margin
    hang_s: float = 240.0          # lost = no deadline and not ended after this long
    seed: int = 0


@dataclass
class Plan:
    index: int
    kind: str
    kwargs: dict[str, Any]
    deadline_s: float | None = None
    cancel_after_s: float | None = None
    max_tokens: int | None = None


class PromptMaker:
    """Seeded text of about ``n`` tokens of the served model's tokenizer."""

    def __init__(self, tokenizer, rng: random.Random, max_model_len: int) -> None:
        from benchmarks.workloads import filler_text

        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.ids = tokenizer(filler_text(rng, 4 * max_model_len), add_special_tokens=False)["input_ids"]
        self.rng = rng

    def text(self, n: int) -> str:
        start = self.rng.randrange(0, max(len(self.ids) - n, 1))
        return self.tokenizer.decode(self.ids[start:start + n]).strip() or "hello"


def make_plan(index: int, rng: random.Random, s: Settings, prompts: PromptMaker) -> Plan:
    """One request of the mix (pure given ``rng``)."""
    kw: dict[str, Any] = {"request_id": f"soak-{index}"}
    if rng.random() < s.invalid_frac:
        what = rng.choice(INVALID_KINDS)
        base = {"prompt": prompts.text(8), "max_tokens": 4}
        bad = {
            "max_tokens_zero": {"max_tokens": 0},
            "negative_temperature": {"temperature": -1.0},
            "top_p_too_big": {"top_p": 1.5},
            "negative_top_k": {"top_k": -1},
            "empty_chat": {"prompt": None, "messages": []},
            "bad_role": {"prompt": None, "messages": [{"role": "robot", "content": "hi"}]},
            "no_input": {"prompt": None},
            "prompt_too_long": {"prompt": prompts.text(prompts.max_model_len + 200)},
        }[what]
        return Plan(index, f"invalid:{what}", {**kw, **base, **bad}, max_tokens=None)
    n_in = rng.randint(*s.prompt_tokens)
    n_out = rng.randint(*s.output_tokens)
    kw.update(max_tokens=n_out, ignore_eos=True)
    if rng.random() < s.sampled_frac:
        kw.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
    if rng.random() < s.chat_frac:
        kind = "chat"
        kw["messages"] = [{"role": "system", "content": "You are terse."}] if rng.random() < 0.3 else []
        kw["messages"].append({"role": "user", "content": prompts.text(n_in)})
    else:
        kind = "raw"
        kw["prompt"] = prompts.text(n_in)
    deadline = round(rng.uniform(*s.deadline_s), 2) if rng.random() < s.deadline_frac else None
    cancel = round(rng.uniform(*s.cancel_window_s), 3) if rng.random() < s.cancel_frac else None
    return Plan(index, kind, kw, deadline_s=deadline, cancel_after_s=cancel, max_tokens=n_out)


class Driver:
    """Sends plans over ``connections`` grpc.aio channels (plan i on channel i mod n, so that
    router replicas, which the kernel gives whole connections, all get traffic) and records
    how each one ended. Like :mod:`router.client`, a call that fails UNAVAILABLE before any
    response (a router replica died or is draining) is sent again, per its ``RetryPolicy``."""

    def __init__(self, address: str, s: Settings, t0: float, connections: int = 1) -> None:
        from router.client import AsyncClient

        self.clients = [AsyncClient(address) for _ in range(max(connections, 1))]
        self.client = self.clients[0]
        self.s = s
        self.t0 = t0
        self.records: list[Record] = []
        self.inflight: dict[int, Record] = {}
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, plan: Plan) -> asyncio.Task:
        task = asyncio.create_task(self.run_one(plan))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run_one(self, plan: Plan, record: bool = True) -> Record:
        import grpc

        from router.client import FINISH_NAMES, build_request

        r = Record(plan.index, plan.kind, plan.kwargs.get("request_id", ""), plan.deadline_s, plan.cancel_after_s,
                   max_tokens=plan.max_tokens)
        if record:
            self.records.append(r)
        self.inflight[plan.index] = r
        kw = dict(plan.kwargs)
        prompt, messages = kw.pop("prompt", None), kw.pop("messages", None)
        call = None
        timer = None

        def cancel() -> None:
            if call is not None and not call.done():
                r.cancel_sent = True
                call.cancel()

        async def consume() -> None:
            nonlocal call, timer
            client = self.clients[plan.index % len(self.clients)]
            request = build_request(prompt, messages, **kw)
            deadline = time.monotonic() + (plan.deadline_s if plan.deadline_s is not None else self.s.hang_s)
            tries = 0
            while True:
                tries += 1
                answered = False  # any response: from then on a retry could duplicate tokens
                timeout = max(deadline - time.monotonic(), 0.001) if plan.deadline_s is not None else None
                call = client.stub.Generate(request, timeout=timeout, metadata=client.metadata)
                if plan.cancel_after_s is not None and timer is None:
                    timer = asyncio.get_running_loop().call_later(plan.cancel_after_s, cancel)
                try:
                    async for resp in call:
                        answered = True
                        if resp.token_ids and r.first_token_at is None:
                            r.first_token_at = self.now()
                        r.tokens += len(resp.token_ids)
                        if resp.finish_reason:
                            r.finish_reason = FINISH_NAMES[resp.finish_reason]
                            r.attempts = resp.timings.attempts
                            r.prefill_worker = resp.timings.prefill_worker
                            r.decode_worker = resp.timings.decode_worker
                        if not r.request_id:
                            r.request_id = resp.request_id
                    return
                except grpc.RpcError as e:
                    if not r.cancel_sent and client.retry.should_retry(e, started=answered, tries=tries,
                                                                       deadline=deadline):
                        r.client_retries += 1
                        await asyncio.sleep(client.retry.backoff_s(tries))
                        continue
                    r.status, r.details = e.code().name, (e.details() or "")[:300]
                    return
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not r.cancel_sent or (task is not None and task.cancelling()):
                        raise  # the watchdog, not our cancel
                    r.status = "CANCELLED"
                    return

        bound = (plan.deadline_s + self.s.margin_s) if plan.deadline_s is not None else self.s.hang_s
        r.sent_at = self.now()
        try:
            await within(consume(), timeout_s=bound)
        except asyncio.TimeoutError:
            r.hung = True
            r.details = f"no finish_reason and no status after {bound:.0f} s"
            log(f"LOST (hung) {r.request_id} {r.kind} deadline={r.deadline_s} tokens={r.tokens}")
        except Exception as e:  # noqa: BLE001 - anything else is a client-side surprise: keep it, don't crash
            r.status = r.status or f"CLIENT_ERROR:{type(e).__name__}"
            r.details = repr(e)[:300]
        finally:
            if timer is not None:
                timer.cancel()
            if call is not None and not call.done():
                call.cancel()
            r.ended_at = self.now()
            self.inflight.pop(plan.index, None)
        if classify(r) == "lost" and not r.hung:
            log(f"LOST (stream ended without finish_reason or status) {r.request_id} {r.kind} tokens={r.tokens}")
        return r

    async def traffic(self, plans: Iterable[Plan], until_s: float, rng: random.Random) -> int:
        """Open-loop arrivals (plus bursts) until ``until_s``, at most ``concurrency`` in flight."""
        sem = asyncio.Semaphore(self.s.concurrency)
        next_burst = self.s.burst_every_s / 2  # bursts at 5, 15, 25... s; the kill (at a third) falls between
        sent = 0
        plans = iter(plans)
        while self.now() < until_s:
            n = 1
            if self.now() >= next_burst:
                n, next_burst = self.s.burst_size, next_burst + self.s.burst_every_s
            for _ in range(n):
                await sem.acquire()
                self.spawn(next(plans)).add_done_callback(lambda _t: sem.release())
                sent += 1
            await asyncio.sleep(rng.expovariate(self.s.rate_rps))
        log(f"traffic stopped after {sent} requests; waiting for {len(self.tasks)} in flight")
        while self.tasks:  # the kill's burst included
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        return sent

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


# ------------------------------------------------------------- the cluster
async def ray_get(ref: Any, timeout: float = 60.0) -> Any:
    import ray

    return await asyncio.to_thread(ray.get, ref, timeout=timeout)


async def worker_pids(pool_manager: Any) -> dict[str, int]:
    table = await ray_get(pool_manager.table.remote())
    pids = await asyncio.gather(*(ray_get(w.handle.pid.remote()) for w in table.workers))
    return {w.worker_id: pid for w, pid in zip(table.workers, pids)}


def kill_burst_plans(kind: str, n: int, prompts: Any, max_model_len: int) -> list[Plan]:
    """Requests sent just before the kill so that the victim surely has work: long outputs
    (they are decoding when a decode worker dies) or long prompts (in prefill when a prefill worker dies)."""
    n_in, n_out = (min(600, max_model_len // 2), 8) if kind == "prefill" else (48, min(200, max_model_len // 4))
    return [Plan(10**6 + j, "raw", {"request_id": f"soak-kill-{j}", "prompt": prompts.text(n_in), "max_tokens": n_out,
                                    "ignore_eos": True}, max_tokens=n_out) for j in range(n)]


async def inject_kill(pool_manager: Any, kind: str, at_s: float, driver: Driver, samples: dict[str, ProcSample],
                      burst: list[Plan]) -> dict[str, Any]:
    """At ``at_s``, send ``burst``, then SIGKILL one worker of ``kind`` while it is busy with it;
    wait until the pool is back to size."""
    out: dict[str, Any] = {"requested": True, "kind": kind}
    await asyncio.sleep(max(at_s - driver.now(), 0))
    try:
        table = await ray_get(pool_manager.table.remote())
        before = sorted(table.worker_ids(kind))
        target = table.targets[kind]
        victim = next(w for w in table.workers if w.worker_id == before[0])
        pid = await ray_get(victim.handle.pid.remote())
        for round_ in range(3):  # a burst refused whole (RESOURCE_EXHAUSTED) is sent again, twice at most
            plans = [replace(p, index=p.index + 1000 * round_,
                             kwargs={**p.kwargs, "request_id": f"{p.kwargs['request_id']}-{round_}"}) for p in burst]
            for p in plans:
                driver.spawn(p)
            await asyncio.sleep(0)
            mine = [r for r in driver.records if r.index in {p.index for p in plans}]
            if kind == "prefill":
                await asyncio.sleep(0.3)  # the long prompts are queued or in prefill
            else:  # until half the burst streams tokens (is decoding), at most 15 s
                wait_until = time.monotonic() + 15
                while time.monotonic() < wait_until and sum(r.first_token_at is not None for r in mine) < len(mine) / 2:
                    if all(r.ended_at is not None for r in mine):
                        break
                    await asyncio.sleep(0.05)
            if any(r.ended_at is None for r in mine):
                break
            log(f"the kill's burst ended before the kill ({Counter(r.status for r in mine)}); again")
        for r in driver.inflight.values():
            r.during_kill = True
        out.update(worker_id=victim.worker_id, pid=pid, inflight_at_kill=len(driver.inflight),
                   burst=len(burst))
        os.kill(pid, signal.SIGKILL)
        t_kill = driver.now()
        out["at_s"] = round(t_kill, 2)
        log(f"killed {victim.worker_id} (pid {pid}) at t={t_kill:.1f} s with {len(driver.inflight)} in flight")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            table = await ray_get(pool_manager.table.remote())
            ids = table.worker_ids(kind)
            new = sorted(ids - set(before))
            if victim.worker_id not in ids and new and len(ids) >= target:
                out["replacement_id"] = new[0]
                out["back_to_size_s"] = round(driver.now() - t_kill, 2)
                handle = next(w.handle for w in table.workers if w.worker_id == new[0])
                new_pid = await ray_get(handle.pid.remote())
                out["replacement_pid"] = new_pid
                samples[new[0]] = ProcSample(new[0], new_pid, rss_mb(new_pid), note=f"replaced {victim.worker_id}")
                samples[victim.worker_id].note = f"killed at t={t_kill:.1f} s"
                log(f"{new[0]} replaced {victim.worker_id} after {out['back_to_size_s']} s")
                break
        else:
            out["error"] = "the pool was not back to size within 300 s"
        out["replacements"] = (await ray_get(pool_manager.stats.remote())).replacements
    except Exception as e:  # noqa: BLE001 - reported, and fails the run
        out["error"] = repr(e)
        log(f"kill failed: {e!r}")
    return out


async def inject_manager_kill(pool_manager: Any, at_s: float, driver: Driver) -> dict[str, Any]:
    """At ``at_s``, SIGKILL the pool manager; wait until Ray has restarted it and it has adopted
    the live workers (the router serves from its cached table meanwhile)."""
    out: dict[str, Any] = {"requested": True}
    await asyncio.sleep(max(at_s - driver.now(), 0))
    try:
        before = (await ray_get(pool_manager.table.remote())).worker_ids()
        pid = await ray_get(pool_manager.pid.remote())
        os.kill(pid, signal.SIGKILL)
        t_kill = driver.now()
        out.update(pid=pid, at_s=round(t_kill, 2), inflight_at_kill=len(driver.inflight))
        log(f"killed the pool manager (pid {pid}) at t={t_kill:.1f} s with {len(driver.inflight)} in flight")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            try:
                stats = await ray_get(pool_manager.stats.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - still restarting
                continue
            out.update(back_s=round(driver.now() - t_kill, 2), adopted=sorted(stats.adopted),
                       workers_before=sorted(before), new_pid=await ray_get(pool_manager.pid.remote()))
            log(f"the pool manager is back after {out['back_s']} s, adopting {out['adopted']}")
            break
        else:
            out["error"] = "the pool manager was not back within 300 s"
    except Exception as e:  # noqa: BLE001 - reported, and fails the run
        out["error"] = repr(e)
        log(f"pool manager kill failed: {e!r}")
    return out


async def inject_router_kill(dep: Any, at_s: float, driver: Driver, samples: dict[str, ProcSample],
                             burst: list[Plan]) -> dict[str, Any]:
    """At ``at_s``, send ``burst``, then SIGKILL the router replica carrying the most requests; wait
    until Ray has restarted it and it serves again (the others serve meanwhile; clients retry on them)."""
    import ray

    from cluster.router_replica import router_actor_name

    out: dict[str, Any] = {"requested": True}
    await asyncio.sleep(max(at_s - driver.now(), 0))
    try:
        # Long streams over every connection first, so that every replica carries some, started
        # and not, when one dies (traffic alone may leave nothing in flight at that instant).
        mine = [driver.spawn(p) for p in burst]
        until = time.monotonic() + 15
        while time.monotonic() < until and not all(t.done() for t in mine):
            stats = await dep.router_stats()
            started = [r for r in driver.inflight.values() if r.index in {p.index for p in burst} and r.first_token_at]
            if len(started) >= len(burst) // 2 and all(st.inflight > 0 for st in stats):
                break
            await asyncio.sleep(0.05)
        stats = await dep.router_stats()
        victim = max(stats, key=lambda st: st.inflight)
        name = router_actor_name(victim.index)
        for r in driver.inflight.values():
            r.during_router_kill = True
        os.kill(victim.pid, signal.SIGKILL)
        t_kill = driver.now()
        out.update(replica=name, pid=victim.pid, at_s=round(t_kill, 2), inflight_at_kill=len(driver.inflight),
                   carried=victim.inflight, others_inflight={router_actor_name(st.index): st.inflight
                                                             for st in stats if st.index != victim.index})
        log(f"killed router replica {name} (pid {victim.pid}) at t={t_kill:.1f} s carrying {victim.inflight} "
            f"requests ({len(driver.inflight)} in flight in all)")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            try:
                handle = await asyncio.to_thread(ray.get_actor, name, namespace=dep.cfg.ray.namespace)
                back = await ray_get(handle.stats.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - still restarting
                continue
            if back.pid != victim.pid:
                out.update(back_s=round(driver.now() - t_kill, 2), new_pid=back.pid)
                samples[f"{name}#2"] = ProcSample(f"{name}#2", back.pid, rss_mb(back.pid),
                                                  note=f"restarted after {out['back_s']} s")
                if name in samples:
                    samples[name].note = f"killed at t={t_kill:.1f} s"
                log(f"router replica {name} back after {out['back_s']} s (pid {back.pid})")
                break
        else:
            out["error"] = "the router replica was not back within 300 s"
    except Exception as e:  # noqa: BLE001 - reported, and fails the run
        out["error"] = repr(e)
        log(f"router kill failed: {e!r}")
    return out


def router_kill_outcome(r: Record) -> str:
    """How a request in flight at the router kill ended; a failure says whether tokens had streamed
    (then it reached the dead router: the client may not retry) or not (it should have been retried)."""
    c = classify(r)
    if c != "failed":
        return c
    return f"failed:{r.status}:{'after' if r.first_token_at is not None else 'before'} the first token"


async def router_inflight(dep: Any) -> int:
    return sum(st.inflight for st in await dep.router_stats())


async def settle(client: Any, dep: Any, settle_s: float) -> tuple[list[dict[str, Any]], float]:
    """Poll ClusterStatus until no worker holds a block (and no router has anything in flight)."""
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    while True:
        rows = worker_blocks(await client.status())
        inflight = await router_inflight(dep)
        if leaked_blocks(rows) == 0 and inflight == 0:
            break
        if time.monotonic() - t0 > settle_s:
            log(f"still held after {settle_s:.0f} s: {leaked_by_worker(rows)}; router in flight: {inflight}")
            break
        await asyncio.sleep(1.0)
    return rows, round(time.monotonic() - t0, 1)


async def soak(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    from benchmarks.common import busy_cores
    from cluster.deployment import BackgroundDeployment
    from engine.model_loader import load_tokenizer
    from benchmarks.deployments import make_config
    from cluster.router_replica import router_actor_name

    p, d_ = (int(x) for x in args.ratio.split(":"))
    cfg = make_config(args.model, backend="gloo", ratio=args.ratio, replicas=args.replicas,
                      router={"max_queued": args.max_queued, "replicas": args.routers},
                      kvtransfer={"lease_s": args.lease_s}, decode={"max_running": 32})
    pools = (f"{cfg.pools.counts()[0]} prefill + {cfg.pools.counts()[1]} decode, ratio {p}:{d_}, kv gloo, "
             f"{args.routers} router{'s' if args.routers > 1 else ''}")
    log(f"starting the deployment: {pools}, model {args.model}")
    tokenizer = await asyncio.to_thread(load_tokenizer, args.model)
    rng = random.Random(s.seed)
    prompts = PromptMaker(tokenizer, random.Random(s.seed + 1), cfg.model.max_model_len or 1024)
    busy_before = await asyncio.to_thread(busy_cores, 1.0)
    dep = BackgroundDeployment(cfg)
    address = await asyncio.to_thread(dep.start)
    log(f"router at {address}")
    t0 = time.monotonic()
    driver = Driver(address, s, t0, connections=args.connections)
    try:
        pool_manager = dep.deployment.pool_manager
        # Warm-up: every worker sees a few requests before the RSS baseline.
        warm = [make_plan(-(i + 1), random.Random(1000 + i), Settings(duration_s=0, invalid_frac=0, cancel_frac=0,
                                                                        deadline_frac=0), prompts) for i in range(8)]
        for w in warm:
            w.kwargs["request_id"] = f"warmup-{-w.index}"
        res = await asyncio.gather(*(driver.run_one(w, record=False) for w in warm))
        log(f"warm-up: {Counter(classify(r) for r in res)}")
        pids = await worker_pids(pool_manager)
        label = "driver+router" if args.routers == 1 else "driver"  # the client (and the in-process router)
        samples = {label: ProcSample(label, os.getpid(), rss_mb(os.getpid()))}
        if args.routers > 1:
            for st in await dep.deployment.router_stats():
                name = router_actor_name(st.index)
                samples[name] = ProcSample(name, st.pid, rss_mb(st.pid))
        for wid, pid in sorted(pids.items()):
            samples[wid] = ProcSample(wid, pid, rss_mb(pid))
        driver.t0 = time.monotonic()  # from here on, times are from the start of the traffic
        t_start = 0.0
        plans = (make_plan(i, rng, s, prompts) for i in range(10**9))
        burst = kill_burst_plans(args.kill, args.kill_burst, prompts, prompts.max_model_len)
        kill_task = asyncio.create_task(inject_kill(pool_manager, args.kill, t_start + s.duration_s / 3, driver,
                                                    samples, burst)) if args.kill != "none" else None
        router_burst = [replace(p, index=2 * 10**6 + p.index, kwargs={**p.kwargs, "request_id": f"soak-router-kill-{j}"})
                        for j, p in enumerate(kill_burst_plans("decode", args.kill_burst, prompts,
                                                               prompts.max_model_len))]
        router_task = asyncio.create_task(inject_router_kill(dep.deployment, t_start + s.duration_s / 2, driver,
                                                             samples, router_burst)) if args.kill_router else None
        manager_task = asyncio.create_task(inject_manager_kill(pool_manager, t_start + 2 * s.duration_s / 3, driver)
                                           ) if args.kill_manager else None
        sent = await driver.traffic(plans, t_start + s.duration_s, random.Random(s.seed + 2))
        drain_s = round(driver.now() - s.duration_s, 1)  # after the last send until every request ended
        kill = await kill_task if kill_task is not None else {"requested": False}
        manager_kill = await manager_task if manager_task is not None else {"requested": False}
        router_kill = await router_task if router_task is not None else {"requested": False}
        log(f"all {sent} requests ended; settling (at most {args.settle_s:.0f} s)")
        blocks_end, settle_s = await settle(driver.client, dep.deployment, args.settle_s)
        for smp in samples.values():
            smp.end_mb = rss_mb(smp.pid)
        # Still serving after all that?
        post = [make_plan(-(100 + i), random.Random(2000 + i), Settings(duration_s=0, invalid_frac=0, cancel_frac=0,
                                                                        deadline_frac=0), prompts) for i in range(4)]
        for w in post:
            w.kwargs["request_id"] = f"post-{-w.index}"
        post_res = await asyncio.gather(*(driver.run_one(w, record=False) for w in post))
        post_check = dict(Counter(classify(r) for r in post_res))
        busy_after = await asyncio.to_thread(busy_cores, 1.0)
        records = driver.records
        during = [r for r in records if r.during_kill]
        during_router = [r for r in records if r.during_router_kill]
        routers_end = await dep.deployment.router_stats()
        report = build_report(
            records, blocks_end, list(samples.values()), kill,
            duration_s=s.duration_s, drain_s=drain_s, settle_s=settle_s, model=args.model, pools=pools, seed=s.seed,
            concurrency=s.concurrency, max_queued=args.max_queued, lease_s=args.lease_s,
            inflight_at_kill_outcomes=dict(Counter(classify(r) for r in during)),
            inflight_at_kill_attempts=dict(Counter(r.attempts for r in during if classify(r) == "completed")),
            inflight_at_router_kill_outcomes=dict(Counter(router_kill_outcome(r) for r in during_router)),
            client_retries=sum(r.client_retries for r in records),
            router_inflight_end=sum(st.inflight for st in routers_end),
            # a killed replica's count dies with it: attempts beyond the first since each router started
            router_retries=sum(st.retries for st in routers_end),
            router_kill=router_kill, post_check=post_check, other_cpu_cores={"before": busy_before, "after": busy_after},
        )
        report["manager_kill"] = manager_kill
        if args.records:
            report["request_records"] = [asdict(r) for r in records]
        return report
    finally:
        await driver.close()
        log("stopping the deployment")
        await asyncio.to_thread(dep.stop)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=None, help="seconds of traffic (default 180; --quick 60)")
    ap.add_argument("--quick", action="store_true", help="60 s of traffic")
    ap.add_argument("--model", default="builtin:tiny-llama", help="e.g. builtin:smollm2-135m-instruct")
    ap.add_argument("--ratio", default="1:1", help="prefill:decode ratio")
    ap.add_argument("--replicas", type=int, default=4, help="workers over both pools (a multiple of P+D)")
    ap.add_argument("--kill", choices=("decode", "prefill", "none"), default="decode",
                    help="the kind of worker SIGKILLed at a third of the run")
    ap.add_argument("--no-kill-manager", dest="kill_manager", action="store_false",
                    help="do not SIGKILL the pool manager at two thirds of the run")
    ap.add_argument("--routers", type=int, default=2,
                    help="router.replicas: router replica actors sharing the port (1: the router runs in this process)")
    ap.add_argument("--no-kill-router", dest="kill_router", action="store_false",
                    help="do not SIGKILL a router replica at half the run (never done with --routers 1)")
    ap.add_argument("--connections", type=int, default=4,
                    help="client channels the traffic is spread over (router replicas get whole connections)")
    ap.add_argument("--kill-burst", type=int, default=8,
                    help="requests sent just before the kill so that the victim is busy")
    ap.add_argument("--concurrency", type=int, default=32, help="most requests in flight")
    ap.add_argument("--rate", type=float, default=6.0, help="mean arrivals per second between bursts")
    ap.add_argument("--burst", type=int, default=28, help="requests sent at once every 10 s")
    ap.add_argument("--max-queued", type=int, default=24, help="router.max_queued (bursts past it: RESOURCE_EXHAUSTED)")
    ap.add_argument("--lease-s", type=float, default=30.0, help="kvtransfer.lease_s (the project's default)")
    ap.add_argument("--settle-s", type=float, default=None,
                    help="longest wait for the blocks to free (default 2 leases + 15 s)")
    ap.add_argument("--margin-s", type=float, default=30.0, help="lost = not ended by deadline + this")
    ap.add_argument("--hang-s", type=float, default=240.0, help="lost = no deadline and not ended after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--records", action="store_true", help="put every request's record in the JSON")
    ap.add_argument("--json", metavar="PATH", help="write the report as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.kill_router = args.kill_router and args.routers > 1
    duration = args.duration_s if args.duration_s is not None else (60.0 if args.quick else 180.0)
    if args.settle_s is None:
        args.settle_s = 2 * args.lease_s + 15.0
    s = Settings(duration_s=duration, concurrency=args.concurrency, rate_rps=args.rate, burst_size=args.burst,
                 margin_s=args.margin_s, hang_s=args.hang_s, seed=args.seed)
    import ray

    from benchmarks.common import start_ray

    start_ray(RAY_NAMESPACE, num_cpus=2)
    try:
        report = asyncio.run(soak(args, s))
    finally:
        ray.shutdown()
    print(render(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json}")
    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
