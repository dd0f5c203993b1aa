"""Config values that would start a broken (or open) cluster are refused at load time, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ClusterConfig, ConfigError, load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOKEN_AND_TLS = "auth_token_file: /t, tls_cert: /c.pem, tls_key: /k.pem"

# (YAML, the dotted field the error must name). One row per bad value.
REFUSED = [
    ("kvtransfer: {lease_s: .inf}", "kvtransfer.lease_s"),
    ("kvtransfer: {lease_s: .nan}", "kvtransfer.lease_s"),
    ("kvtransfer: {lease_s: 1.0e+300}", "kvtransfer.lease_s"),
    ("kvtransfer: {timeout_s: .inf}", "kvtransfer.timeout_s"),
    ("router: {request_timeout_s: .inf}", "router.request_timeout_s"),
    ("router: {request_timeout_s: 1.0e+12}", "router.request_timeout_s"),  # threading: OverflowError
    ("router: {queue_timeout_s: .inf}", "router.queue_timeout_s"),
    ("router: {drain_grace_s: .inf}", "router.drain_grace_s"),
    ("pools: {prefill: {batch_wait_ms: .inf}}", "pools.prefill.batch_wait_ms"),
    ("pools: {decode: {num_cpus: .inf}}", "pools.decode.num_cpus"),
    ("router: {max_queued: 0}", "router.max_queued"),
    ("kvtransfer: {chunk_bytes: 1}", "kvtransfer.chunk_bytes"),
    ("kvtransfer: {chunk_bytes: 4096}", "kvtransfer.chunk_bytes"),
    # A prefill (or decode) KV cache that cannot hold one max_model_len request.
    ("model: {max_model_len: 2048}\npools: {prefill: {num_blocks: 16}}", "pools.prefill.num_blocks"),
    ("model: {max_model_len: 2048}\npools: {decode: {num_blocks: 127}}", "pools.decode.num_blocks"),
    ("model: {max_model_len: 2048}\npools: {mode: colocated, decode: {num_blocks: 64}}", "pools.decode.num_blocks"),
    ("router: {metrics_port: 50051}", "router.metrics_port"),
    ("router: {port: 9000, metrics_port: 9000}", "router.metrics_port"),
    # Replica i serves /metrics on metrics_port + i: none of them may be the client port.
    ("router: {replicas: 2, port: 9465, metrics_port: 9464}", "router.metrics_port"),
    ("router: {replicas: 2, metrics_port: 65535}", "router.metrics_port"),
    ("router: {replicas: 0}", "router.replicas"),
    ("router: {http_port: 50051}", "router.http_port"),
    ("router: {http_port: 9464}", "router.http_port"),
    ("router: {http_port: 70000}", "router.http_port"),
    ("pools: {decode: {num_blocks: 1e15}}", "pools.decode.num_blocks"),
    ("kvtransfer: {secret_env: KV, secret_file: /kv}", "kvtransfer.secret_file"),
    # pools.autoscale: bounds that exclude the starting size, inverted loads, a bad ratio, colocated.
    ("pools: {autoscale: {min_total: 4, max_total: 8}}", "pools.autoscale.min_total"),
    ("pools: {ratio: '1:1', replicas: 2, autoscale: {min_total: 2, max_total: 1}}", "pools.autoscale.max_total"),
    ("pools: {autoscale: {low_load: 0.9, high_load: 0.5}}", "pools.autoscale.low_load"),
    ("pools: {autoscale: {ratio: 'fast'}}", "pools.autoscale.ratio"),
    ("pools: {autoscale: {cooldown_s: .inf}}", "pools.autoscale.cooldown_s"),
    ("pools: {mode: colocated, autoscale: {}}", "pools.autoscale"),
    # Off loopback: the router needs a token and TLS, the KV plane a secret, /metrics stays local.
    ("router: {host: 0.0.0.0}", "router.host"),
    ("router: {host: '::'}", "router.host"),
    ("router: {host: 10.1.2.3}", "router.host"),
    ("router: {host: router.example.com}", "router.host"),
    ("router: {host: 0.0.0.0, auth_token_env: T}", "router.host"),  # a token in clear text
    ("router: {host: 0.0.0.0, tls_cert: /c.pem, tls_key: /k.pem}", "router.host"),  # TLS, anyone in
    ("router: {metrics_host: 0.0.0.0}", "router.metrics_host"),
    ("router: {metrics_host: 10.1.2.3}", "router.metrics_host"),
    ("kvtransfer: {host: 0.0.0.0, secret_env: KV}", "kvtransfer.host"),  # not an address to advertise
    ("kvtransfer: {host: 10.1.2.3}", "kvtransfer.host"),
    ("kvtransfer: {host: auto}", "kvtransfer.host"),
    ("kvtransfer: {host: ''}", "kvtransfer.host"),
]


@pytest.mark.parametrize(("text", "field"), REFUSED, ids=[f"{f}={t.split(':', 2)[-1].strip(' }')}" for t, f in REFUSED])
def test_refused_naming_the_field(text, field):
    with pytest.raises(ConfigError) as info:
        load_config(text)
    assert any(p.startswith(f"{field}: ") for p in info.value.problems), info.value.problems


ACCEPTED = [
    "",  # the defaults
    "router: {port: 0, metrics_port: 0}",  # both pick a free port
    "router: {port: 0, metrics_port: 0, http_port: 0}",  # all three
    "router: {http_port: null}",  # the HTTP API off
    "router: {host: localhost}",
    "router: {host: 127.0.0.2}",
    f"router: {{host: 0.0.0.0, {TOKEN_AND_TLS}}}",
    "kvtransfer: {host: auto, secret_env: KV}",
    "kvtransfer: {host: 10.1.2.3, secret_file: /kv}",
    "model: {max_model_len: 2048}\npools: {prefill: {num_blocks: 128}, decode: {num_blocks: 128}}",
    "model: {max_model_len: 2048}\npools: {mode: colocated, prefill: {num_blocks: 1}, decode: {num_blocks: 128}}",
    "router: {request_timeout_s: 86400, drain_grace_s: 0}",
    "router: {replicas: 1, port: 9465, metrics_port: 9464}",  # one router: 9465 is not a /metrics port
    "router: {replicas: 3, port: 9463, metrics_port: 9464}",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_sound_values_still_load(text):
    load_config(text)


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_shipped_configs_still_load(name):
    assert isinstance(load_config(DEPLOY / name), ClusterConfig)


def test_defaults_are_loopback_and_closed():
    rc = ClusterConfig().router
    assert (rc.host, rc.metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert ClusterConfig().kvtransfer.host == "127.0.0.1"
