"""Colocated mode (``pools.mode: colocated``): every replica runs both phases
of its requests, as a single engine does. The same cluster code serves it;
output is exact, no KV moves, and a replica that dies mid-stream has its
requests resumed on another."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import ray

from benchmarks.deployments import make_config, running
from router.client import Client
from tests.integration.clusters import assert_exact, block_usage, generate_many, stream_all, wait_until, word_prompts


@pytest.fixture(scope="module")
def colocated(ray_head):
    with running(make_config(mode="colocated", replicas=2)) as (d, address):
        yield d, address


def test_colocated_replicas_serve_exactly_without_moving_kv(colocated, tiny_model):
    _, address = colocated
    texts = word_prompts(8, seed=51)
    outs = generate_many(address, [dict(prompt=t, max_tokens=10, ignore_eos=True) for t in texts])
    status = Client(address).status()
    assert_exact(tiny_model, texts, outs, 10)
    assert [p.kind for p in status.pools] == ["colocated"]
    assert sorted(w.worker_id for w in status.pools[0].workers) == ["colocated-0", "colocated-1"]
    assert all(w.requests_served > 0 for w in status.pools[0].workers)
    for o in outs:
        t = o.timings
        assert t.prefill_worker == t.decode_worker and t.transfer_bytes == 0 and t.attempts == 1
        assert 0 < t.timeline.prefill_start_ms <= t.timeline.prefill_end_ms <= t.timeline.first_token_ms


def test_n_samples_over_http_prefill_once_and_fork_on_one_replica(colocated):
    """OpenAI ``n``: one replica prefills the prompt once and forks the samples over its
    blocks; sample i equals a lone gRPC request with seed + i; nothing stays held."""
    import openai

    d, address = colocated
    workers = d.deployment.router.servicer.directory.of_kind("colocated")

    def forks() -> int:
        return sum(s.forks for s in ray.get([w.handle.status.remote() for w in workers], timeout=30))

    before = forks()
    http = openai.OpenAI(base_url=d.deployment.http_url, api_key="unused", max_retries=0, timeout=120)
    c = http.completions.create(model="", prompt="fork me a story", max_tokens=8, temperature=1.0, n=3, seed=99,
                                extra_body={"ignore_eos": True, "return_token_ids": True})
    assert forks() - before == 2
    client = Client(address)
    for choice in sorted(c.choices, key=lambda ch: ch.index):
        lone = client.generate("fork me a story", max_tokens=8, temperature=1.0, seed=99 + choice.index,
                               ignore_eos=True)
        assert choice.model_extra["token_ids"] == lone.token_ids
    assert wait_until(lambda: all(u == 0 for u, _ in block_usage(address).values()), 5, "blocks freed") < 5


def test_a_dead_replica_s_streams_resume_on_another(colocated, tiny_model):
    d, address = colocated
    texts = word_prompts(6, seed=52)
    victim = d.deployment.router.servicer.directory.workers["colocated-0"]
    state = {"killed": False}

    def on_progress(counts):
        if not state["killed"] and min(counts) >= 3:
            state["killed"] = True
            os.kill(ray.get(victim.handle.pid.remote(), timeout=30), signal.SIGKILL)

    outs = asyncio.run(stream_all(address, texts, on_progress, max_new=150))  # long enough to be cut mid-stream
    assert state["killed"]
    assert_exact(tiny_model, texts, outs, 150)
    assert any(o.timings.attempts > 1 for o in outs)
    pm = d.deployment.pool_manager
    wait_until(lambda: ray.get(pm.counts.remote(), timeout=30) == {"colocated": 2}, 120, "the pool back to 2", 0.5)
    wait_until(lambda: all(u == 0 for u, _ in block_usage(address).values()), 15, "no blocks left held")

