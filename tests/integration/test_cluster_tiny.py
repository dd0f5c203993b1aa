"""Cluster shape on the fast tiny model: each CPU KV backend end to end,
ratios, scaling while requests run, the scale CLI."""

from __future__ import annotations

import random
import subprocess
import sys
import threading

import pytest
import ray

from benchmarks.deployments import make_config, running
from kvtransfer.endpoints import NodeLocalEndpoint
from router.client import Client
from tests.integration.clusters import generate_many
from tests.reference import Comparison, compare_greedy

MAX_NEW = 12


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "page", "block", "ray", "split"]
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(2, 30))) for _ in range(n)]


def check_exact(tiny_model, texts, outs) -> None:
    total = Comparison()
    for text, out in zip(texts, outs):
        ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(out.token_ids) == MAX_NEW and out.finish_reason == "length"
        total.add(compare_greedy(tiny_model.model, ids, out.token_ids, MAX_NEW, ignore_eos=True))
    assert total.exact + total.near_ties == len(texts) and total.near_ties <= 1


def pool_sizes(address: str) -> dict[str, int]:
    return {p.kind: len(p.workers) for p in Client(address).status().pools}


# same_node "backend": the pair is on one node, so the default ("shm") would bypass the backend under test.
@pytest.mark.parametrize("backend,same_node", [("gloo", "backend"), ("grpc", "backend"), ("ray", "backend"),
                                               ("gloo", "shm")])
def test_backend_end_to_end(ray_head, tiny_model, backend, same_node):
    texts = prompts(8, seed=hash(backend) % 1000)
    with running(make_config(backend=backend, kvtransfer={"same_node": same_node})) as (d, address):
        outs = generate_many(address, [dict(prompt=t, max_tokens=MAX_NEW, ignore_eos=True) for t in texts])
        status = Client(address).status()
        workers = ray.get(d.deployment.pool_manager.table.remote(), timeout=60).workers
    # With shm, every worker advertises shared memory on its own Ray node (all one node here), so every
    # prefill/decode pair takes it (kvtransfer.node_local); without, none advertises it.
    shm = [w.endpoint.shm if isinstance(w.endpoint, NodeLocalEndpoint) else None for w in workers]
    if same_node == "shm":
        assert all(s is not None and s.node == w.node_id for s, w in zip(shm, workers))
        assert len({(s.node, s.host_key) for s in shm}) == 1
    else:
        assert shm == [None] * len(workers)
    check_exact(tiny_model, texts, outs)
    for pool in status.pools:
        assert all(w.requests_served > 0 for w in pool.workers), pool


@pytest.mark.parametrize("ratio,expected", [("2:1", {"prefill": 2, "decode": 1}), ("1:2", {"prefill": 1, "decode": 2})])
def test_ratio_sets_actor_counts(ray_head, tiny_model, ratio, expected):
    texts = prompts(6, seed=3)
    with running(make_config(ratio=ratio, replicas=3)) as (d, address):
        assert pool_sizes(address) == expected
        outs = generate_many(address, [dict(prompt=t, max_tokens=MAX_NEW, ignore_eos=True) for t in texts])
    check_exact(tiny_model, texts, outs)


def test_scaling_keeps_the_ratio_and_loses_no_request(ray_head, tiny_model):
    cfg = make_config(ratio="1:1", replicas=2)
    texts = prompts(24, seed=4)
    with running(cfg) as (d, address):
        results = {}

        def traffic():
            results["outs"] = generate_many(address, [dict(prompt=t, max_tokens=MAX_NEW, ignore_eos=True) for t in texts])

        t = threading.Thread(target=traffic)
        t.start()
        pm = d.deployment.pool_manager
        assert ray.get(pm.scale.remote(4), timeout=300) == {"prefill": 2, "decode": 2}
        t.join(timeout=600)
        check_exact(tiny_model, texts, results["outs"])
        # Scale down through the CLI while another burst runs.
        more = prompts(16, seed=5)
        t2 = threading.Thread(target=lambda: results.update(more=generate_many(
            address, [dict(prompt=x, max_tokens=MAX_NEW, ignore_eos=True) for x in more])))
        t2.start()
        cli = subprocess.run([sys.executable, "-m", "cluster.scale", "--total", "2", "--namespace", cfg.ray.namespace,
                              "--address", ray_head.gcs_address], capture_output=True, text=True, timeout=300,
                             env=ray_head.env())
        assert cli.returncode == 0, cli.stderr
        assert "prefill=1 decode=1" in cli.stdout
        t2.join(timeout=600)
        check_exact(tiny_model, more, results["more"])
        bad = subprocess.run([sys.executable, "-m", "cluster.scale", "--total", "3", "--namespace", cfg.ray.namespace,
                              "--address", ray_head.gcs_address], capture_output=True, text=True, timeout=300,
                             env=ray_head.env())
        assert bad.returncode == 2 and "must be a positive multiple of 2" in bad.stderr
        import time

        deadline = time.monotonic() + 120
        while pool_sizes(address) != {"prefill": 1, "decode": 1} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pool_sizes(address) == {"prefill": 1, "decode": 1}
