"""pools.autoscale on a live tiny cluster: under steady load the decode pool (few running slots) is
under pressure, so the autoscaler adds a decode worker and, at max_total, switches the idle prefill
worker to decode in place; once the load stops it drains back to min_total. Every request finishes
complete and exact, and no KV block is left used anywhere.

The order is deterministic: the deployment starts at min_total (2:1, 3 workers), so nothing can
shrink before the load arrives (an idle prefill worker drained at start-up would leave no worker to
switch); the first decode pressure can only add a worker (to max_total, 2:2), and the next, at the
cap, can only move the idle prefill worker (1:3). Idle again, the pools drain back to 3 (1:2).
Decode's pressure must not lapse in between (a lapse lets the idle prefill worker be drained instead,
then a fresh decode start): besides the running slots, whose share dips for a moment when a new decode
worker joins before the router sends it work, a TPOT target no request can meet keeps decode under
pressure as long as requests finish, and only then."""

from __future__ import annotations

import asyncio
import threading
import time

import ray

from benchmarks.deployments import make_config, running
from router.client import AsyncClient
from worker_common.routing_table import RoutingTable
from tests.integration.clusters import block_usage, word_prompts

MAX_NEW = 16
STREAMS = 6
AUTOSCALE = {"ratio": "auto", "min_total": 3, "max_total": 4, "tpot_s": 1e-4, "interval_s": 0.5,
             "scale_up_window_s": 1.0, "scale_down_window_s": 2.0, "cooldown_s": 1.0, "high_load": 0.8,
             "low_load": 0.3}


def table(pm) -> RoutingTable:
    return ray.get(pm.table.remote(), timeout=30)


def kinds(pm) -> dict[str, int]:
    out = {"prefill": 0, "decode": 0}
    for w in table(pm).workers:
        out[w.kind] += 1
    return out


def wait_pools(pm, want: dict[str, int], timeout_s: float, what: str) -> None:
    """Until the routing table holds ``want`` workers of each kind; the failure names the last decision."""
    deadline = time.monotonic() + timeout_s
    while kinds(pm) != want:
        if time.monotonic() > deadline:
            r = table(pm).autoscale
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: pools {kinds(pm)}, targets "
                                 f"{r.targets}, pending {r.pending}, last {r.last_action}: {r.last_reason}")
        time.sleep(0.2)


def test_scale_up_switch_role_and_scale_down_under_live_load(ray_head, tiny_model):
    # 2 running slots per decode worker, so a few streams keep decode under pressure; prefill idles.
    cfg = make_config(ratio="2:1", replicas=3, autoscale=AUTOSCALE, decode={"max_running": 2})
    texts = word_prompts(200, seed=14, lo=2, hi=12)
    with running(cfg) as (d, address):
        pm = d.deployment.pool_manager
        stop = threading.Event()
        outs: list = []

        async def load():
            client = AsyncClient(address, timeout_s=120)

            async def stream(k: int):
                i = k
                while not stop.is_set():
                    outs.append((texts[i % len(texts)],
                                 await client.generate(prompt=texts[i % len(texts)], max_tokens=MAX_NEW,
                                                       ignore_eos=True)))
                    i += STREAMS

            try:
                await asyncio.gather(*(stream(k) for k in range(STREAMS)))
            finally:
                await client.close()

        traffic = threading.Thread(target=lambda: asyncio.run(load()))
        traffic.start()
        t0 = time.monotonic()
        try:
            # Decode under pressure: (2, 1) -> (2, 2) with one fresh decode worker (scale up), then at
            # max_total the idle prefill worker switches to decode in place (rebalance): (1, 3).
            wait_pools(pm, {"prefill": 1, "decode": 3}, 90, "a new decode worker and a prefill worker switched")
            t_switch = time.monotonic() - t0
        finally:
            stop.set()
            traffic.join(timeout=120)
        report = table(pm).autoscale
        decisions = dict(report.decisions)
        assert decisions["scale_up"] >= 1 and report.last_start_s is not None
        # The prefill worker left its pool by an in-place switch, not a drain and a fresh start.
        assert report.role_switches == 1 and report.switch_failures == 0, report
        assert decisions["rebalance"] == 1 and report.last_switch_s is not None, report
        assert decisions["scale_up"] == 1 and decisions["scale_down"] == 0, report
        # Idle: back to min_total, draining (never killing) the extra worker.
        wait_pools(pm, {"prefill": 1, "decode": 2}, 60, "the pools to shrink to min_total")
        assert dict(table(pm).autoscale.decisions)["scale_down"] >= 1
        usage = block_usage(address)
    print(f"\nautoscale live: (1, 3) after {t_switch:.1f} s; in-place switch {report.last_switch_s} s "
          f"vs fresh start {report.last_start_s:.2f} s; {len(outs)} requests")
    assert len(outs) >= STREAMS
    for text, out in outs:  # none lost, none cut short, each exactly the reference
        assert len(out.token_ids) == MAX_NEW and out.finish_reason == "length", (text, out)
    from tests.reference import Comparison, compare_greedy

    total, sample = Comparison(), outs[:: max(1, len(outs) // 12)]  # the reference runs on this process's CPU
    for text, out in sample:
        ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
        total.add(compare_greedy(tiny_model.model, ids, out.token_ids, MAX_NEW, ignore_eos=True))
    assert total.near_ties <= 1 and total.exact + total.near_ties == len(sample)
    assert all(used == 0 for used, _ in usage.values()), usage  # no block leaked on any worker left
