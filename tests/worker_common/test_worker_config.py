"""Worker settings: one name per setting from the YAML to the engine, the
engine part of a pool section handed over whole, colocation decided once."""

from __future__ import annotations

import inspect

from cluster.config import parse_config
from cluster.deployment import pool_specs
from engine.llm_engine import LLMEngine
from kvtransfer.faults import TransferFaults
from worker_common.worker_config import DecodeEngineConfig, PrefillEngineConfig, resolve_node_id


def test_engine_settings_are_named_as_the_engine_names_them():
    engine_params = set(inspect.signature(LLMEngine).parameters)
    assert set(PrefillEngineConfig().engine_args()) <= engine_params
    assert set(DecodeEngineConfig().engine_args()) <= engine_params
    assert "batch_wait_ms" not in PrefillEngineConfig().engine_args()  # the batching wait is the worker's


def test_pool_specs_hand_each_worker_its_section_and_the_one_lease():
    cfg = parse_config({
        "pools": {"ratio": "1:1", "replicas": 2,
                  "prefill": {"num_cpus": 0.5, "max_batched_tokens": 512, "batch_wait_ms": 5.0},
                  "decode": {"num_gpus": 0, "kv_cache_bytes": 1 << 20, "max_running": 8}},
        "kvtransfer": {"backend": "grpc", "lease_s": 7.0, "chunk_bytes": 65536, "shm_pool_bytes": 1 << 20},
    })
    faults = TransferFaults(delay_s=0.1)
    prefill, decode = pool_specs(cfg, kv_secret="s3cret", faults=faults)
    assert (prefill.kind, decode.kind) == ("prefill", "decode")
    assert type(prefill.engine) is PrefillEngineConfig and type(decode.engine) is DecodeEngineConfig
    assert prefill.engine == PrefillEngineConfig(max_batched_tokens=512, batch_wait_ms=5.0)
    assert decode.engine == DecodeEngineConfig(kv_cache_bytes=1 << 20, max_running=8)
    assert prefill.handoff is decode.handoff and prefill.handoff.lease_s == 7.0
    assert prefill.handoff.transport_kwargs() == {"host": "127.0.0.1", "chunk_bytes": 65536, "secret": "s3cret",
                                                  "faults": faults, "stream_idle_s": 10.0,
                                                  "max_streams_per_peer": 64,  # grpc's stream bounds
                                                  # same-node pairs through shared memory (the default),
                                                  # on the node the calling process runs on (None without Ray)
                                                  "same_node": "shm", "node_id": resolve_node_id(),
                                                  "shm_pool_bytes": 1 << 20}
    assert prefill.num_cpus == 0.5 and prefill.model == cfg.model


def test_colocated_is_one_pool_of_decode_settings():
    cfg = parse_config({"pools": {"mode": "colocated", "replicas": 3, "decode": {"max_running": 4}},
                        "kvtransfer": {"backend": "ray", "same_node": "backend"}})
    assert cfg.pools.colocated and cfg.pools.counts() == (0, 3)
    (spec,) = pool_specs(cfg)
    assert spec.kind == "colocated" and spec.engine == DecodeEngineConfig(max_running=4)
    assert spec.handoff.transport_kwargs() == {"namespace": cfg.ray.namespace}
    assert not parse_config({}).pools.colocated
