"""KV caches are checked against the model's shape and the memory before any actor starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from analysis.model_catalog import TINY_MODEL
from cluster.config import GiB, ConfigError, load_config
from cluster.deployment import Deployment
from cluster.preflight import MemoryLimits, check_kv_fits, cluster_memory_limits, kv_bytes_per_block, preflight
from analysis.bottleneck import load_dims

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TINY = f"model: {{name: '{TINY_MODEL}', max_model_len: 1024}}\n"
TINY_DIMS = load_dims(TINY_MODEL)[0]
LIMITS = MemoryLimits(host_bytes=16 * GiB, accelerator_bytes=80 * GiB)

# (pools YAML under the tiny model, the dotted field the error must name)
TOO_BIG = [
    ("pools: {decode: {num_blocks: 1000000000000000}}", "pools.decode.num_blocks"),
    ("pools: {prefill: {num_blocks: 1000000000000}}", "pools.prefill.num_blocks"),
    ("pools: {decode: {kv_cache_bytes: 1000000000000000}}", "pools.decode.kv_cache_bytes"),
    ("pools: {decode: {kv_cache_bytes: 40000}}", "pools.decode.kv_cache_bytes"),  # < one max_model_len request
    # GPU pools are bounded by one accelerator, not by host memory.
    ("pools: {decode: {num_gpus: 1, kv_cache_bytes: 90000000000}}", "pools.decode.kv_cache_bytes"),
    ("pools: {mode: colocated, decode: {num_blocks: 10000000000}}", "pools.decode.num_blocks"),
]


def test_bytes_per_block_is_the_caches_layout():
    # tiny-llama: 2 layers x 2 KV heads x head_dim 16, K and V, float32, 16 tokens.
    assert kv_bytes_per_block(TINY_DIMS, "float32", 16) == 2 * 2 * 2 * 16 * 4 * 16
    assert kv_bytes_per_block(TINY_DIMS, "bfloat16", 16) == 2 * 2 * 2 * 16 * 2 * 16


@pytest.mark.parametrize(("pools", "field"), TOO_BIG)
def test_kv_that_cannot_fit_is_refused_naming_the_field(pools, field):
    with pytest.raises(ConfigError) as info:
        check_kv_fits(load_config(TINY + pools), TINY_DIMS, LIMITS)
    assert any(p.startswith(f"{field}: ") for p in info.value.problems), info.value.problems


def test_what_fits_passes_and_the_bound_is_the_pools_own():
    cfg = load_config(TINY + "pools: {decode: {num_gpus: 1, kv_cache_bytes: 20000000000}}")
    check_kv_fits(cfg, TINY_DIMS, LIMITS)  # 20 GB on an 80 GB accelerator, though the host has 16
    with pytest.raises(ConfigError, match="pools.decode.kv_cache_bytes"):
        check_kv_fits(load_config(TINY + "pools: {decode: {kv_cache_bytes: 20000000000}}"), TINY_DIMS, LIMITS)


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml", None])
def test_shipped_configs_pass_on_this_machine(name):
    preflight(load_config(DEPLOY / name) if name else load_config(""))


def test_unknown_model_names_the_field():
    with pytest.raises(ConfigError, match="model.name: "):
        preflight(load_config("model: {name: /no/such/model}"), cluster_memory_limits())


def test_deployment_refuses_before_any_actor_starts(monkeypatch):
    import cluster.deployment

    class NoRay:
        def remote(self, *args, **kwargs):
            raise AssertionError("an actor was started before the config was checked")

    monkeypatch.setattr(cluster.deployment, "ray", NoRay())
    cfg = load_config(TINY + "pools: {decode: {num_blocks: 1000000000000000}}")
    with pytest.raises(ConfigError, match="pools.decode.num_blocks"):
        asyncio.run(Deployment(cfg).start())
