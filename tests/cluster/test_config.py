"""The YAML config tree: defaults, the shipped files, and every refusal's path and reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import (
    ClusterConfig,
    ConfigError,
    DecodePoolConfig,
    PoolsConfig,
    PrefillPoolConfig,
    dump_config,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return info.value.problems


def test_empty_yaml_is_the_default_config():
    cfg = load_config("")
    assert cfg == ClusterConfig() == parse_config({})
    assert cfg.model.name == "builtin:smollm2-135m-instruct" and cfg.model.dtype == "float32"
    assert (cfg.pools.ratio, cfg.pools.replicas, cfg.pools.counts()) == ("1:1", 2, (1, 1))
    assert cfg.pools.decode.num_blocks == 2048 and cfg.pools.decode.kv_cache_bytes is None
    assert cfg.kvtransfer.backend == "gloo" and cfg.kvtransfer.chunk_bytes == 4 * 1024 * 1024
    assert (cfg.router.host, cfg.router.port, cfg.router.policy) == ("127.0.0.1", 50051, "least_loaded")
    assert cfg.ray.address is None and cfg.ray.namespace == "splitserve"


def test_config_is_frozen():
    with pytest.raises(Exception):
        ClusterConfig().router.port = 1  # type: ignore[misc]


def test_local_yaml():
    cfg = load_config(DEPLOY / "local.yaml")
    assert cfg.pools.counts() == (1, 1)
    assert cfg.pools.prefill.num_cpus + cfg.pools.decode.num_cpus <= 1  # leaves a core of 2 for the rest
    assert cfg.kvtransfer.backend == "gloo"
    assert (cfg.router.host, cfg.router.port, cfg.router.http_port) == ("127.0.0.1", 50051, 8000)
    # What won the colocated-vs-disaggregated benchmark here: short uncached parts skip the prefill pool.
    assert cfg.router.policy == "prefix_aware" and cfg.router.conditional_prefill_max_tokens == 64


def test_gpu_yaml():
    cfg = load_config(str(DEPLOY / "gpu.yaml"))
    assert cfg.pools.counts() == (2, 1)
    assert cfg.kvtransfer.backend == "nccl"
    assert cfg.pools.prefill.num_gpus == cfg.pools.decode.num_gpus == 1
    assert cfg.pools.decode.num_blocks is None and cfg.pools.decode.kv_cache_bytes > 0


def test_k8s_manifests_are_yaml_and_the_configmap_matches_gpu_yaml():
    cluster = list(yaml.safe_load_all((DEPLOY / "k8s" / "raycluster.yaml").read_text()))
    assert cluster[0]["apiVersion"] == "ray.io/v1" and cluster[0]["kind"] == "RayCluster"
    assert {"headGroupSpec", "workerGroupSpecs"} <= set(cluster[0]["spec"])
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "rayjob.yaml").read_text())}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"] == "python -m cluster.launch --config /app/deploy/gpu.yaml"
    mounts = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["mountPath"] == "/app/deploy/gpu.yaml" for m in mounts)
    assert load_config(docs["ConfigMap"]["data"]["gpu.yaml"]) == load_config(DEPLOY / "gpu.yaml")


def test_dump_round_trips():
    for cfg in (ClusterConfig(), load_config(DEPLOY / "gpu.yaml"), load_config("pools: {prefill: {replicas: 4}, decode: {replicas: 2}}")):
        assert load_config(dump_config(cfg)) == cfg


def test_ratio_not_dividing_replicas_is_refused():
    assert problems('pools: {ratio: "2:1", replicas: 4}') == ["pools.replicas: 4 is not a multiple of 3 = 2+1 (ratio 2:1)"]


def test_ratio_counts_and_scaling():
    pools = load_config('pools: {ratio: "2:1", replicas: 3}').pools
    assert pools.counts() == (2, 1) and pools.ratio_pair() == (2, 1)
    assert pools.counts_for_total(6) == (4, 2)
    with pytest.raises(ValueError, match="multiple of 3"):
        pools.counts_for_total(4)
    with pytest.raises(ValueError):
        pools.counts_for_total(0)
    assert load_config('pools: {ratio: "2:1"}').pools.counts() == (2, 1)  # ratio alone: one group
    assert load_config("pools: {replicas: 4}").pools.counts() == (2, 2)  # replicas alone: 1:1


def test_unquoted_ratio_is_not_read_as_base_60():
    # YAML 1.1 reads a bare 2:1 as the integer 121.
    assert load_config("pools: {ratio: 2:1, replicas: 6}").pools.counts() == (4, 2)


def test_explicit_counts():
    pools = load_config("pools: {prefill: {replicas: 4}, decode: {replicas: 2}}").pools
    assert pools.counts() == (4, 2)
    assert pools.ratio_pair() == (2, 1)  # reduced by the gcd
    assert pools.counts_for_total(9) == (6, 3)
    agreeing = load_config('pools: {ratio: "2:1", replicas: 6, prefill: {replicas: 4}, decode: {replicas: 2}}')
    assert agreeing.pools.counts() == (4, 2)


def test_conflicting_ratio_and_counts_are_refused():
    assert problems('pools: {ratio: "1:1", prefill: {replicas: 2}, decode: {replicas: 1}}') == [
        "pools.ratio: 1:1 disagrees with prefill.replicas 2 and decode.replicas 1"
    ]
    assert problems("pools: {replicas: 4, prefill: {replicas: 2}, decode: {replicas: 1}}") == [
        "pools.replicas: 4 disagrees with prefill.replicas + decode.replicas = 3"
    ]
    (only,) = problems("pools: {prefill: {replicas: 2}}")
    assert only.startswith("pools.decode.replicas: required")


def test_typo_is_refused_with_path_and_suggestion():
    assert problems("pools: {prefill: {num_cpu: 1}}") == ["pools.prefill.num_cpu: unknown field (did you mean num_cpus?)"]
    assert problems("routr: {}") == ["routr: unknown field (did you mean router?)"]
    (only,) = problems("model: {zzz: 1}")
    assert only.startswith("model.zzz: unknown field (known fields: name, dtype")


@pytest.mark.parametrize("ratio", ['"2"', '"0:1"', '"a:b"', '"1:0"', '"2:1:1"', "2"])
def test_bad_ratio_is_refused(ratio):
    (only,) = problems(f"pools: {{ratio: {ratio}}}")
    assert only.startswith("pools.ratio: ")


def test_bad_values_are_refused_with_reason():
    assert problems("router: {port: 70000}") == ["router.port: must be <= 65535"]
    assert problems("router: {port: -1}") == ["router.port: must be >= 0"]
    assert problems("model: {dtype: fp8}") == ["model.dtype: must be 'float32', 'bfloat16' or 'float16'; got 'fp8'"]
    assert problems('pools: {decode: {num_blocks: "12"}}') == ["pools.decode.num_blocks: must be an integer; got '12'"]
    assert problems("kvtransfer: {lease_s: 0}") == ["kvtransfer.lease_s: must be > 0"]
    assert problems("pools: {prefill: {resources: {GPU: 1}}}") == [
        "pools.prefill.resources: set CPU and GPU with num_cpus / num_gpus, not here (got GPU)"
    ]
    assert problems("pools: {decode: {resources: {tpu: -1}}}") == ["pools.decode.resources.tpu: must be >= 0"]
    assert problems("pools: 3") == ["pools: must be a mapping of fields; got 3"]


def test_nccl_needs_gpus():
    expected = ["kvtransfer.backend: nccl needs GPUs: set pools.prefill.num_gpus and pools.decode.num_gpus >= 1"]
    assert problems("kvtransfer: {backend: nccl}") == expected
    assert problems("kvtransfer: {backend: nccl}\npools: {prefill: {num_gpus: 1}}") == expected
    ok = load_config("kvtransfer: {backend: nccl}\npools: {prefill: {num_gpus: 1}, decode: {num_gpus: 1}}")
    assert ok.kvtransfer.backend == "nccl"


def test_inproc_is_refused_for_a_cluster():
    (only,) = problems("kvtransfer: {backend: inproc}")
    assert only.startswith("kvtransfer.backend: inproc only works inside one process")
    assert "gloo, grpc or ray" in only


def test_kv_budget_is_blocks_or_bytes():
    decode = load_config("pools: {decode: {kv_cache_bytes: 1048576}}").pools.decode
    assert (decode.num_blocks, decode.kv_cache_bytes) == (None, 1048576)
    assert problems("pools: {decode: {num_blocks: 10, kv_cache_bytes: 1048576}}") == [
        "pools.decode.kv_cache_bytes: set either num_blocks or kv_cache_bytes, not both"
    ]
    assert problems("pools: {decode: {num_blocks: null}}") == ["pools.decode.num_blocks: set num_blocks or kv_cache_bytes"]


def test_every_problem_is_reported_together():
    text = """
model: {dtype: fp8}
pools:
  ratio: "2"
  prefill: {num_cpu: 1}
kvtransfer: {backend: inproc}
router: {port: 70000}
"""
    with pytest.raises(ConfigError) as info:
        load_config(text)
    assert info.value.problems == [
        "model.dtype: must be 'float32', 'bfloat16' or 'float16'; got 'fp8'",
        "pools.ratio: must look like \"P:D\" (prefill:decode), e.g. \"2:1\"; got '2'",
        "pools.prefill.num_cpu: unknown field (did you mean num_cpus?)",
        "kvtransfer.backend: inproc only works inside one process, not across a cluster; use gloo, grpc or ray",
        "router.port: must be <= 65535",
    ]
    message = str(info.value)
    assert "5 problems" in message
    assert all(line in message.splitlines()[i + 1] for i, line in enumerate(info.value.problems))


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: {ratio: [\n")
    with pytest.raises(ConfigError, match="bad.yaml") as info:
        load_config(bad)
    assert "invalid YAML at line" in str(info.value)

    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml[\s\S]*top level must be a mapping"):
        load_config(listing)

    with pytest.raises(ConfigError, match=r"missing\.yaml[\s\S]*cannot read"):
        load_config(str(tmp_path / "missing.yaml"))

    dup = tmp_path / "dup.yaml"
    dup.write_text("router: {port: 1}\nrouter: {port: 2}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml[\s\S]*duplicate key 'router'"):
        load_config(dup)

    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["not", "a", "mapping"])


def test_sections_can_be_built_in_python():
    # Core code and tests build sections directly; the same checks apply.
    assert PoolsConfig(ratio="3:1", replicas=8).counts() == (6, 2)
    with pytest.raises(ValueError):
        PoolsConfig(ratio="3:1", replicas=5)
    explicit = PoolsConfig(prefill=PrefillPoolConfig(replicas=2), decode=DecodePoolConfig(replicas=1))
    assert explicit.counts() == (2, 1) and explicit.ratio is None


def test_colocated_mode_sizes_one_pool():
    pools = load_config("pools: {mode: colocated, replicas: 3}").pools
    assert pools.mode == "colocated" and pools.counts() == (0, 3)
    assert load_config("pools: {mode: colocated}").pools.counts() == (0, 2)
    assert problems("pools: {mode: colocated, prefill: {replicas: 1}}") == [
        "pools.prefill.replicas: does not apply with mode colocated; set pools.replicas"]
    (only,) = problems("pools: {mode: mixed}")
    assert only.startswith("pools.mode: ")


def test_router_security_and_limits_are_validated():
    assert problems("router: {tls_cert: /x.pem}") == ["router.tls_key: set both tls_cert and tls_key, or neither"]
    assert problems("router: {auth_token_env: A, auth_token_file: /t}") == [
        "router.auth_token_file: set auth_token_env or auth_token_file, not both"]
    (only,) = problems("router: {max_attempts: 0}")
    assert only.startswith("router.max_attempts: ")
    cfg = load_config("router: {metrics_port: null, max_request_bytes: 4096}")
    assert cfg.router.metrics_port is None and cfg.router.max_request_bytes == 4096


def test_grpc_stream_bounds_are_validated_and_reach_the_transport():
    from cluster.deployment import pool_specs

    assert problems("kvtransfer: {stream_idle_s: 0}") == ["kvtransfer.stream_idle_s: must be > 0"]
    assert problems("kvtransfer: {stream_idle_s: .inf}") == ["kvtransfer.stream_idle_s: must be a finite number; got inf"]
    assert problems("kvtransfer: {stream_idle_s: 601}") == ["kvtransfer.stream_idle_s: must be <= 600"]
    assert problems("kvtransfer: {max_streams_per_peer: 0}") == ["kvtransfer.max_streams_per_peer: must be >= 1"]
    cfg = load_config("kvtransfer: {backend: grpc, stream_idle_s: 2.5, max_streams_per_peer: 8}")
    for spec in pool_specs(cfg):
        kw = spec.handoff.transport_kwargs()
        assert kw["stream_idle_s"] == 2.5 and kw["max_streams_per_peer"] == 8
    for spec in pool_specs(load_config("kvtransfer: {backend: gloo}")):  # only grpc takes them
        assert "stream_idle_s" not in spec.handoff.transport_kwargs()


def test_router_replicas_default_to_two_on_linux_and_one_elsewhere(monkeypatch):
    import cluster.config as config

    assert ClusterConfig().router.replicas == (2 if sys.platform.startswith("linux") else 1)
    monkeypatch.setattr(config.sys, "platform", "darwin")
    assert ClusterConfig().router.replicas == 1
    with pytest.raises(ConfigError) as info:
        load_config("router: {replicas: 2}")
    assert any(p.startswith("router.replicas: ") for p in info.value.problems), info.value.problems
