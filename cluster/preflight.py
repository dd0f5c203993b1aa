"""Checks of a config against the model and the machines, before any actor starts.

``cluster.config`` checks what a file says on its own; this checks what needs
the model's shape or the cluster's memory: a KV cache that cannot be
allocated, or that cannot hold one request of ``model.max_model_len`` tokens.
A worker that found out itself would fail (or swap the node to a halt) after
the pools had started; here the launch stops with the field's dotted path.

    preflight(cfg)                                 # raises ConfigError
    check_kv_fits(cfg, dims, MemoryLimits(...))    # the same, with explicit facts (tests)
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from analysis.bottleneck import load_dims
from analysis.cost_model import ModelDims, dtype_bytes
from cluster.config import GiB, ClusterConfig, ConfigError

# One accelerator's memory is not visible from the head (a CPU pod on
# Kubernetes), so a GPU pool's KV is bounded by the largest single
# accelerator sold today (288 GB); the worker's own allocation reports a
# smaller GPU. This catches the typo (num_blocks: 1000000000000000), not a
# config 10% too big for its card.
MAX_ACCELERATOR_BYTES = 288 * GiB
SOURCE = "(checked against the model and this cluster's memory)"


@dataclass(frozen=True)
class MemoryLimits:
    """The most KV one actor can hold: in host memory (CPU pools) or on one accelerator (GPU pools)."""

    host_bytes: int
    accelerator_bytes: int = MAX_ACCELERATOR_BYTES


def total_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cluster_memory_limits() -> MemoryLimits:
    """This machine's memory, or a larger Ray node's (its ``memory`` + ``object_store_memory``) if connected."""
    host = total_memory_bytes()
    try:
        import ray

        if ray.is_initialized():
            for node in ray.nodes():
                if node.get("Alive"):
                    res = node.get("Resources", {})
                    host = max(host, int(res.get("memory", 0) + res.get("object_store_memory", 0)))
    except Exception:  # noqa: BLE001 - an unreachable GCS leaves the local bound, never blocks the launch
        pass
    return MemoryLimits(host_bytes=host)


def kv_bytes_per_block(dims: ModelDims, dtype: str, block_size: int) -> int:
    """K and V of ``block_size`` tokens over every layer, as the paged cache stores them."""
    return int(2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * dtype_bytes(dtype) * block_size)


def check_kv_fits(cfg: ClusterConfig, dims: ModelDims, limits: MemoryLimits) -> None:
    """Raise ConfigError unless every pool's KV cache fits one actor's memory and holds a whole request."""
    problems: list[str] = []
    pools = cfg.pools
    sections = [("decode", pools.decode)] + ([] if pools.colocated else [("prefill", pools.prefill)])
    for name, section in sorted(sections):
        kv_dtype = section.dtype or cfg.model.dtype  # the pool's KV cache is kept in its dtype
        per_block = kv_bytes_per_block(dims, kv_dtype, section.block_size)
        if section.num_blocks is not None:
            field, kv_bytes, blocks = "num_blocks", section.num_blocks * per_block, section.num_blocks
        else:
            field, kv_bytes = "kv_cache_bytes", section.kv_cache_bytes
            blocks = kv_bytes // per_block
        path = f"pools.{name}.{field}"
        gpu = section.num_gpus > 0
        limit = limits.accelerator_bytes if gpu else limits.host_bytes
        if kv_bytes > limit:
            where = "one accelerator" if gpu else "the largest node's memory"
            problems.append(f"{path}: {kv_bytes} bytes of KV ({per_block} bytes per block of {section.block_size} "
                            f"tokens for {cfg.model.name} in {kv_dtype}) do not fit {where} ({limit} bytes)")
        elif cfg.model.max_model_len is not None and blocks * section.block_size < cfg.model.max_model_len:
            problems.append(f"{path}: {blocks} blocks hold {blocks * section.block_size} tokens, less than "
                            f"model.max_model_len {cfg.model.max_model_len}")
    if problems:
        raise ConfigError(SOURCE, problems)


def preflight(cfg: ClusterConfig, limits: MemoryLimits | None = None) -> None:
    """Check ``cfg`` against its model's shape (read without loading weights) and the memory at hand."""
    try:
        dims = _model_dims(cfg.model.name)
    except SystemExit as exc:  # load_dims speaks to a CLI user; here it is a config problem
        raise ConfigError(SOURCE, [f"model.name: {exc}"]) from None
    check_kv_fits(cfg, dims, limits if limits is not None else cluster_memory_limits())


@functools.lru_cache(maxsize=8)
def _model_dims(name: str) -> ModelDims:
    # Reading SmolLM2's GGUF header takes seconds; tests start many deployments per process.
    return load_dims(name)[0]
