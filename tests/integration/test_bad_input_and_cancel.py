"""Bad input, cancellation and deadlines on a live tiny cluster (issue 5,
points 1 and 2), and the per-request timeline and metrics (issue 4, points
1 and 2).

Every bad request gets the right status naming the field while valid
requests run beside it and stay exact; a cancel or an expired deadline frees
the KV blocks of both workers within 1 s, whatever stage the request was in;
a storm of cancels leaves every worker's free-block count where it started.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request

import grpc
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.deployments import make_config, running
from observability.stages import TIMINGS_FIELDS, Stage
from protos import serving_pb2
from router.client import AsyncClient, Client, build_request
from tests.integration.clusters import assert_exact, block_usage, wait_until, word_prompts

MAX_NEW = 10
SERVICE = "/splitserve.v1.Serving/Generate"


@pytest.fixture(scope="module")
def cluster(ray_head):
    cfg = make_config(kvtransfer={"lease_s": 2.0}, decode={"num_blocks": 256}, prefill={"num_blocks": 256},
                      router={"max_queued": 512, "max_request_bytes": 64 * 1024})
    with running(cfg) as (d, address):
        yield d, address


def all_free(address: str) -> bool:
    return all(used == 0 for used, _ in block_usage(address).values())


def worker_ids(d) -> list[str]:
    return sorted(w.worker_id for w in d.deployment.router.servicer.directory.workers.values())


async def raw_generate(address: str, payload: bytes) -> grpc.StatusCode:
    """Send hand-made bytes as a GenerateRequest (what no well-behaved client can send)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream(SERVICE, request_serializer=lambda b: b,
                                    response_deserializer=serving_pb2.GenerateResponse.FromString)(payload, timeout=30)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def bad_utf8(field_text: str, **kw) -> bytes:
    """A valid request whose ``field_text`` bytes are replaced by invalid UTF-8 of the same length."""
    data = build_request(**kw).SerializeToString()
    marker = field_text.encode()
    assert data.count(marker) == 1
    return data.replace(marker, b"\xff" * len(marker))


BAD = [  # (request kwargs, status, field named in the message)
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(prompt="y" * 1100), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),  # over max_model_len 1024
    (dict(prompt="x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    (dict(prompt="x", max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    (dict(prompt="x", max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    (dict(prompt="x", temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(prompt="x", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (dict(prompt="x", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (dict(prompt="x", top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
    (dict(prompt="x", stop=[f"s{i}" for i in range(17)]), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
    (dict(prompt="x", stop=["z" * 300]), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop[0]"),
    (dict(prompt="x", stop_token_ids=list(range(65))), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop_token_ids"),
    (dict(messages=[{"role": "user", "content": ""}] * 1025), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages"),
    (dict(prompt="x", model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model"),
    (dict(messages=[]), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), grpc.StatusCode.INVALID_ARGUMENT,
     "chat.messages[0].role"),
    (dict(prompt="q" * 70_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "request"),  # over max_request_bytes
]
BAD_BYTES = [
    (bad_utf8("UTFBAD", prompt="UTFBAD"), "prompt"),
    (bad_utf8("UTFBAD", messages=[{"role": "user", "content": "ok"}, {"role": "user", "content": "UTFBAD"}]),
     "chat.messages[1].content"),
    (bad_utf8("UTFBAD", prompt="x", stop=["fine", "UTFBAD"]), "sampling.stop[1]"),
    (b"\xff\xff\xff\xff", "request"),
]


def test_bad_input_table_beside_valid_traffic(cluster, tiny_model):
    d, address = cluster
    before = worker_ids(d)
    replacements = ray.get(d.deployment.pool_manager.stats.remote(), timeout=30).replacements
    texts = word_prompts(12, seed=11)

    async def go():
        client = AsyncClient(address, timeout_s=120)
        try:
            valid = [asyncio.ensure_future(client.generate(prompt=t, max_tokens=MAX_NEW, ignore_eos=True))
                     for t in texts]

            async def bad(kw):
                try:
                    await client.generate(**kw)
                except grpc.aio.AioRpcError as e:
                    return e.code(), e.details()
                return grpc.StatusCode.OK, ""

            bad_results = await asyncio.gather(*(bad(kw) for kw, _, _ in BAD))
            raw_results = await asyncio.gather(*(raw_generate(address, payload) for payload, _ in BAD_BYTES))
            return await asyncio.gather(*valid), bad_results, raw_results
        finally:
            await client.close()

    outs, bad_results, raw_results = asyncio.run(go())
    for (kw, code, field), (got_code, details) in zip(BAD, bad_results):
        assert got_code == code, (kw.keys(), got_code, details)
        assert details.startswith(f"{field}:") or f"{field}:" in details, (field, details)
    for (_, field), (got_code, details) in zip(BAD_BYTES, raw_results):
        assert got_code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}:"), (field, details)
    assert_exact(tiny_model, texts, outs, MAX_NEW)
    assert worker_ids(d) == before  # no worker restarted
    assert ray.get(d.deployment.pool_manager.stats.remote(), timeout=30).replacements == replacements
    wait_until(lambda: all_free(address), 5, "blocks back after the bad-input run")


def test_subnormal_temperature_beside_greedy_requests_all_succeed(cluster, tiny_model):
    """temperature=1e-40 (a float32 subnormal) once overflowed the sampler and failed the whole batch;
    now it samples safely, and so greedily in effect, while four greedy requests run beside it."""
    _, address = cluster
    texts = word_prompts(5, seed=23)

    async def go():
        client = AsyncClient(address, timeout_s=120)
        try:
            return await asyncio.gather(
                *(client.generate(prompt=t, max_tokens=MAX_NEW, ignore_eos=True) for t in texts[:4]),
                client.generate(prompt=texts[4], max_tokens=MAX_NEW, ignore_eos=True, temperature=1e-40, seed=3))
        finally:
            await client.close()

    outs = asyncio.run(go())
    assert_exact(tiny_model, texts, outs, MAX_NEW)
    wait_until(lambda: all_free(address), 5, "blocks back after the subnormal-temperature run")


def cancel_after(address: str, n_tokens: int, **kw) -> float:
    """Start a long request, cancel it after ``n_tokens`` tokens; seconds until both workers' blocks are free."""
    client = Client(address)
    stream = client.stream("cancel me " * 20, max_tokens=900, ignore_eos=True, **kw)
    got = 0
    if n_tokens:
        for resp in stream:
            got += len(resp.token_ids)
            if got >= n_tokens:
                break
        assert max(u for u, _ in block_usage(address).values()) > 0  # it holds KV mid-stream
    stream.cancel()
    took = wait_until(lambda: all_free(address), 5, "blocks freed after cancel", 0.02)
    client.close()
    return took


@pytest.mark.parametrize("n_tokens", [0, 1, 20])
def test_cancel_frees_both_sides_within_one_second(cluster, n_tokens):
    """0: cancelled before any token (queued / prefilling / in transfer); 1: right after the first token
    (KV just handed over); 20: mid-decode."""
    _, address = cluster
    assert cancel_after(address, n_tokens) < 1.0


def test_expired_deadline_ends_with_deadline_exceeded_and_frees_blocks(cluster):
    _, address = cluster
    client = Client(address, timeout_s=0.4)
    with pytest.raises(grpc.RpcError) as e:
        client.generate("a long one " * 10, max_tokens=900, ignore_eos=True)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: all_free(address), 5, "blocks freed after the deadline", 0.02) < 1.0


def test_deadline_is_honoured_while_queued(cluster):
    """With no KV room anywhere the request waits for a reservation; its deadline still ends it."""
    d, address = cluster
    directory = d.deployment.router.servicer.directory
    decode, prefill = directory.of_kind("decode")[0], directory.of_kind("prefill")[0]
    free = block_usage(address)[decode.worker_id][1]
    assert ray.get(decode.handle.reserve.remote("hog", free * 16 - 1, prefill.endpoint, 30.0), timeout=30) is not None
    try:
        client = Client(address, timeout_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            client.generate("waiting in line", max_tokens=4)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 3.0
    finally:
        ray.get(decode.handle.abort.remote("hog"), timeout=30)
    wait_until(lambda: all_free(address), 5, "the hog's blocks to be freed")
    assert Client(address).generate("after the queue", max_tokens=3).finish_reason == "length"


def test_cancel_storm_leaves_free_blocks_where_they_started(cluster):
    _, address = cluster
    wait_until(lambda: all_free(address), 5, "a cluster at rest (prefill holds released)")
    start = {w: free for w, (_, free) in block_usage(address).items()}
    rng = random.Random(5)
    n = 300

    async def one(client: AsyncClient, i: int) -> str:
        call = client.stub.Generate(build_request(f"storm {i} " * rng.randrange(1, 30), max_tokens=rng.randrange(1, 200),
                                                  ignore_eos=True), timeout=120)
        delay = rng.choice([0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 1.0])

        async def consume():
            async for _ in call:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(delay)
        call.cancel()
        try:
            await task
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as e:
            return e.code().name if isinstance(e, grpc.aio.AioRpcError) else "CANCELLED"
        return "FINISHED"

    async def go():
        client = AsyncClient(address, timeout_s=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(n)))
        finally:
            await client.close()

    outcomes = asyncio.run(go())
    assert set(outcomes) <= {"CANCELLED", "FINISHED"}, set(outcomes)
    assert outcomes.count("CANCELLED") > n // 2
    wait_until(lambda: {w: free for w, (_, free) in block_usage(address).items()} == start, 10,
               "every worker's free blocks back to where they started")
    assert Client(address).generate("after the storm", max_tokens=3).finish_reason == "length"


def test_final_response_carries_the_timeline(cluster):
    _, address = cluster
    out = Client(address).generate("tell me the stages", max_tokens=8, ignore_eos=True)
    t = out.timings
    tl = t.timeline
    stamps = [tl.admitted_ms, tl.reserved_ms, tl.prefill_queued_ms, tl.prefill_start_ms, tl.prefill_end_ms,
              tl.transfer_start_ms, tl.transfer_end_ms, tl.first_token_ms, tl.finished_ms]
    assert all(s > 0 for s in stamps), tl
    assert stamps == sorted(stamps), tl
    assert tl.transfer_end_ms <= tl.decode_queued_ms <= tl.decode_start_ms <= tl.finished_ms
    assert len(tl.token_ms) == 8 and list(tl.token_ms) == sorted(tl.token_ms)
    assert tl.token_ms[0] == pytest.approx(tl.first_token_ms)
    assert t.attempts == 1 and t.transfer_bytes > 0 and t.slowest_stage
    stages = {stage.value: getattr(t, TIMINGS_FIELDS[stage]) for stage in Stage}
    assert all(ms > 0 for ms in stages.values()), stages  # a disaggregated request passes every stage
    assert t.slowest_stage == max(stages, key=stages.get)
    assert t.ttft_ms == pytest.approx(tl.first_token_ms) and t.e2e_ms == pytest.approx(tl.finished_ms)
    assert t.prefill_worker.startswith("prefill-") and t.decode_worker.startswith("decode-")


def test_prometheus_endpoint_reports_requests_stages_and_workers(cluster):
    d, address = cluster
    Client(address).generate("for the metrics", max_tokens=6, ignore_eos=True)
    with pytest.raises(grpc.RpcError):
        Client(address).generate("", max_tokens=6)
    d.run(d.deployment.router.servicer.directory.poll_status())
    port = d.deployment.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("splitserve_time_to_first_token_seconds_count") >= 1
    assert value("splitserve_inter_token_latency_seconds_count") >= 5
    assert value("splitserve_requests_total", outcome="ok") >= 1
    assert value("splitserve_requests_total", outcome="invalid") >= 1
    for stage in Stage:
        assert value("splitserve_request_stage_seconds_count", stage=stage.value) >= 1, stage
    workers = {dict(k[1])["worker_id"] for k in samples if k[0] == "splitserve_worker_steps_total"}
    assert workers == {"prefill-0", "decode-0"}
    mbu = [v for (n, _), v in samples.items() if n == "splitserve_worker_model_bandwidth_utilization_ratio"]
    assert mbu and all(0 < v < 10 for v in mbu)
    sent = value("splitserve_worker_kv_transfer_bytes_total", worker_id="prefill-0", kind="prefill", direction="sent")
    assert sent > 0
