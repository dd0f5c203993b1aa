"""A secured deployment end to end (issue 5, points 5 and 6): TLS on the
client-facing server, a bearer token from an environment variable, the KV
plane's cluster secret; then a graceful drain: new requests get
UNAVAILABLE while in-flight ones finish."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.deployments import make_config, running
from router.client import AsyncClient, Client
from tests.integration.clusters import assert_exact, wait_until, word_prompts
from tests.router.test_security import self_signed

TOKEN = "cluster-test-token-42"
KV_SECRET = "kv-plane-secret-17"


@pytest.fixture(scope="module")
def secured(ray_head, tmp_path_factory, monkeypatch_module):
    cert, key = self_signed(tmp_path_factory.mktemp("tls"), "router", ["localhost"], ["127.0.0.1"])
    monkeypatch_module.setenv("SPLITSERVE_TEST_TOKEN", TOKEN)
    monkeypatch_module.setenv("SPLITSERVE_TEST_KV_SECRET", KV_SECRET)
    cfg = make_config(router={"tls_cert": cert, "tls_key": key, "auth_token_env": "SPLITSERVE_TEST_TOKEN"},
                      kvtransfer={"secret_env": "SPLITSERVE_TEST_KV_SECRET"})
    with running(cfg) as (d, address):
        yield d, address, cert


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_tls_and_token_admit_the_right_client_only(secured, tiny_model):
    d, address, ca = secured
    good = Client(address, tls_ca=ca, token=TOKEN)
    texts = word_prompts(3, seed=41)
    outs = [good.generate(t, max_tokens=6, ignore_eos=True) for t in texts]
    assert_exact(tiny_model, texts, outs, 6)
    for client in (Client(address, tls_ca=ca), Client(address, tls_ca=ca, token="wrong-token-000")):
        with pytest.raises(grpc.RpcError) as e:
            client.generate("let me in", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "wrong-token-000" not in e.value.details() and TOKEN not in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # plaintext to a TLS port
        Client(address, timeout_s=5, token=TOKEN).generate("no tls", max_tokens=2)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # Probes need no token.
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(open(ca, "rb").read()))
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_kv_plane_checked_the_cluster_secret(secured):
    d, address, ca = secured
    d.run(d.deployment.router.servicer.directory.poll_status())
    transfer = {w.worker_id: w.status.kv_transfer for w in d.deployment.router.servicer.directory.workers.values()}
    assert transfer["decode-0"].bytes_received > 0
    assert all(t.refused_unauthenticated == 0 for t in transfer.values())


def test_graceful_drain_finishes_in_flight_and_refuses_new(secured):
    d, address, ca = secured
    results: dict[str, object] = {}

    async def long_ones():
        client = AsyncClient(address, tls_ca=ca, token=TOKEN, timeout_s=120)
        try:
            return await asyncio.gather(*(client.generate(f"drain {i}", max_tokens=150, ignore_eos=True)
                                          for i in range(3)))
        finally:
            await client.close()

    runner = threading.Thread(target=lambda: results.update(outs=asyncio.run(long_ones())))
    runner.start()
    wait_until(lambda: d.deployment.router.servicer.inflight == 3, 30, "3 requests in flight")
    stopper = threading.Thread(target=lambda: d.stop(timeout=120))
    stopper.start()
    wait_until(lambda: not d.deployment.router or not d.deployment.router.servicer.accepting, 10, "draining")
    with pytest.raises(grpc.RpcError) as e:
        Client(address, tls_ca=ca, token=TOKEN, timeout_s=10).generate("too late", max_tokens=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    runner.join(timeout=120)
    stopper.join(timeout=120)
    outs = results["outs"]
    assert [len(o.token_ids) for o in outs] == [150] * 3 and {o.finish_reason for o in outs} == {"length"}
