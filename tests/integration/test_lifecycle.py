"""Request lifecycle on a live tiny cluster: client cancel reaches both
workers, expired leases free their blocks, a repeated prefix hits both
workers' caches and a short prompt skips the prefill pool, dead actors are
replaced, the CLI client streams."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import ray

from benchmarks.deployments import make_config, running
from router.client import Client
from router.policy import make_policy
from router.request_runner import ConditionalPrefill
from tests.reference import compare_greedy


@pytest.fixture(scope="module")
def tiny_cluster(ray_head):
    cfg = make_config(kvtransfer={"lease_s": 1.0})
    with running(cfg) as (d, address):
        yield d, address


def used_blocks(address: str) -> dict[str, int]:
    return {w.worker_id: w.used_blocks for p in Client(address).status().pools for w in p.workers}


def wait_for(predicate, timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_client_cancel_frees_blocks_on_both_workers(tiny_cluster):
    _, address = tiny_cluster
    client = Client(address)
    stream = client.stream("a long answer please", max_tokens=900, ignore_eos=True)
    got = 0
    for resp in stream:
        got += len(resp.token_ids)
        if got >= 5:
            break
    assert max(used_blocks(address).values()) > 0  # the request holds KV mid-stream
    stream.cancel()
    t0 = time.monotonic()
    wait_for(lambda: set(used_blocks(address).values()) == {0}, 5.0, "blocks freed after cancel")
    assert time.monotonic() - t0 < 2.0
    assert client.generate("still serving", max_tokens=3).finish_reason == "length"


def test_expired_lease_frees_a_reservation(tiny_cluster):
    d, address = tiny_cluster
    decode = next(w for w in d.deployment.router.servicer.directory.of_kind("decode"))
    prefill = next(w for w in d.deployment.router.servicer.directory.of_kind("prefill"))
    endpoint = ray.get(decode.handle.reserve.remote("orphan", 100, prefill.endpoint, 5.0), timeout=30)
    assert endpoint is not None
    assert used_blocks(address)[decode.worker_id] > 0  # held, but no KV will ever come
    wait_for(lambda: used_blocks(address)[decode.worker_id] == 0, 10.0, "the lease to expire")


def test_a_repeated_prefix_hits_both_caches_and_a_short_prompt_is_decoded_alone(tiny_cluster, tiny_model):
    """Same long prefix twice: the second prefill skips it on the prefill
    worker and only the KV the decode worker lacks moves; a short prompt
    takes the conditional decode-only path. Outputs stay exact, and once
    all ended every block is free again (cached ones count as free)."""
    d, address = tiny_cluster
    runner = d.deployment.router.servicer.runner
    saved = runner.prefill_policy, runner.decode_policy, runner.conditional
    runner.prefill_policy = runner.decode_policy = make_policy("prefix_aware")
    runner.conditional = ConditionalPrefill(max_uncached_tokens=16)
    client = Client(address)
    system = " ".join(["the cache keeps every full block of this long shared system prompt"] * 12)
    texts = [system + " first question about pages", system + " a second and different question about blocks "
             "that is long enough to need more than one block of its own"]
    try:
        first, second = (client.generate(t, max_tokens=6, ignore_eos=True) for t in texts)
        short = client.generate("hi there", max_tokens=6, ignore_eos=True)
    finally:
        runner.prefill_policy, runner.decode_policy, runner.conditional = saved
    t1, t2, t3 = first.timings, second.timings, short.timings
    assert (t1.path, t2.path, t3.path) == ("disaggregated", "disaggregated", "decode_only")
    n_system = len(tiny_model.tokenizer(system, add_special_tokens=False)["input_ids"])
    assert t2.prefill_cached_tokens >= n_system - 16  # every full block of the shared part
    assert t2.decode_cached_tokens >= n_system - 16 and t2.transfer_bytes_saved > t2.transfer_bytes > 0
    assert t3.transfer_bytes == 0 and t3.decode_worker.startswith("decode")
    for text, out in zip(texts + ["hi there"], (first, second, short)):
        ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert compare_greedy(tiny_model.model, ids, out.token_ids, 6, ignore_eos=True).exact
    workers = [w for p in client.status().pools for w in p.workers]
    assert all(w.used_blocks == 0 and w.free_blocks == w.num_blocks for w in workers)
    assert all(w.cached_blocks > 0 and w.prefix_hit_tokens > 0 for w in workers)


def test_dead_actor_is_replaced_and_pools_return_to_size(tiny_cluster):
    d, address = tiny_cluster
    pm = d.deployment.pool_manager
    victim = ray.get_actor("decode-0", namespace=d.deployment.cfg.ray.namespace)
    ray.kill(victim)
    # Either this call finds the death or the manager's own periodic check already did.
    replaced = ray.get(pm.check_health.remote(), timeout=300)
    assert replaced in (["decode-0"], [])
    wait_for(lambda: "decode-0" not in ray.get(pm.table.remote(), timeout=30).worker_ids(),
             60.0, "the dead actor to leave the table")
    # The replacement starts in the background (the manager's lock is not held while a model loads).
    wait_for(lambda: ray.get(pm.counts.remote(), timeout=30) == {"prefill": 1, "decode": 1}, 300.0,
             "the replacement to start")
    wait_for(lambda: {p.kind: [w.worker_id for w in p.workers] for p in Client(address).status().pools}
             == {"prefill": ["prefill-0"], "decode": ["decode-1"]}, 10.0, "the router to see the new actor")
    out = Client(address).generate("after the replacement", max_tokens=4, ignore_eos=True)
    assert len(out.token_ids) == 4 and out.timings.decode_worker == "decode-1"


def test_cli_client_streams_and_reports_status(tiny_cluster):
    _, address = tiny_cluster
    run = subprocess.run([sys.executable, "-m", "router.client", "--raw", "--max-tokens", "6", "--timeline",
                          "--address", address, "hello"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "6 tokens, finish=length" in run.stderr and "TTFT" in run.stderr
    assert "<- slowest" in run.stderr and "transfer" in run.stderr and "attempts: 1" in run.stderr
    status = subprocess.run([sys.executable, "-m", "router.client", "--status", "--address", address],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and 'kind: "decode"' in status.stdout


def test_bad_input_gets_invalid_argument_naming_the_field(tiny_cluster):
    _, address = tiny_cluster
    client = Client(address)
    cases = [
        (dict(prompt=""), "prompt"),
        (dict(prompt="x", temperature=-1.0), "temperature"),
        (dict(prompt="x", top_p=1.5), "top_p"),
        (dict(prompt="x", max_tokens=-2), "max_tokens"),
        (dict(messages=[]), "chat.messages"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "role"),
    ]
    for kwargs, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(**kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert field in e.value.details(), (field, e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        client.generate("x", model="some-other-model")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_says_not_serving_without_a_decode_worker_and_serving_once_replaced(tiny_cluster):
    """The router's health service tells the truth: its only decode worker killed, it
    reports NOT_SERVING within seconds; the pool manager's replacement brings SERVING back."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    d, address = tiny_cluster
    ok, down = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)

    def status() -> int:
        return stub.Check(health_pb2.HealthCheckRequest(service="splitserve.v1.Serving"), timeout=5).status

    wait_for(lambda: status() == ok, 10.0, "a serving router")
    victim, = [w.worker_id for w in d.deployment.router.servicer.directory.of_kind("decode")]
    ray.kill(ray.get_actor(victim, namespace=d.deployment.cfg.ray.namespace))
    t0 = time.monotonic()
    wait_for(lambda: status() == down, 10.0, "NOT_SERVING after the only decode worker died")
    assert time.monotonic() - t0 < 5.0
    # The pool manager's own health loop replaces it; nothing here asks it to.
    wait_for(lambda: status() == ok, 120.0, "SERVING once the decode worker was replaced")
    assert [w.worker_id for w in d.deployment.router.servicer.directory.of_kind("decode") if w.alive] != [victim]
    assert Client(address).generate("served again", max_tokens=3).finish_reason == "length"
    channel.close()
