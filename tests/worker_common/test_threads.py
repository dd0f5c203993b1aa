"""A worker's torch thread count: set explicitly, never Ray's one thread for a fractional CPU."""

from __future__ import annotations

import pytest
import torch

from cluster.config import parse_config
from worker_common.threads import apply_worker_threads, worker_threads
from worker_common.worker_config import DecodeEngineConfig, PrefillEngineConfig


@pytest.mark.parametrize(("configured", "share", "cores", "expected"), [
    (None, 0.5, 2, 1),    # half a CPU: one thread
    (None, 1.5, 8, 2),    # rounded up
    (None, 6.0, 4, 4),    # never more than the machine's cores
    (None, None, 4, 4),   # outside Ray: every core
    (None, 0.0, 2, 2),    # a zero-CPU actor is not limited by its share
    (3, 0.5, 2, 3),       # an explicit setting wins
])
def test_worker_threads(configured, share, cores, expected):
    assert worker_threads(configured, share, cores) == expected


def test_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert apply_worker_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_is_a_pool_setting_the_engine_never_sees():
    cfg = parse_config({"pools": {"prefill": {"threads": 1}, "decode": {"threads": 2}}})
    assert (cfg.pools.prefill.threads, cfg.pools.decode.threads) == (1, 2)
    assert "threads" not in PrefillEngineConfig(threads=1).engine_args()
    assert "threads" not in DecodeEngineConfig(threads=2).engine_args()
    assert DecodeEngineConfig.part_of(cfg.pools.decode).threads == 2
    with pytest.raises(Exception, match="pools.decode.threads"):
        parse_config({"pools": {"decode": {"threads": 0}}})


def test_pool_formats_override_the_model_and_share_one_kv_dtype():
    from cluster.deployment import pool_specs

    cfg = parse_config({"model": {"dtype": "bfloat16", "quantization": "int8"},
                        "pools": {"prefill": {"quantization": "none"}, "decode": {"quantization": "int4"}}})
    prefill, decode = pool_specs(cfg)
    assert (prefill.model.dtype, prefill.model.quantization) == ("bfloat16", "none")
    assert (decode.model.dtype, decode.model.quantization) == ("bfloat16", "int4")
    assert parse_config({}).model.quantization == "none"
    # KV moves as raw bytes of one dtype: a prefill pool in another dtype is refused by name.
    with pytest.raises(Exception, match="pools.prefill.dtype: the KV hand-off needs one KV dtype"):
        parse_config({"pools": {"prefill": {"dtype": "bfloat16"}}})
    with pytest.raises(Exception, match="pools.decode.compile: the compiled decode step cannot trace the w8a8"):
        parse_config({"model": {"dtype": "bfloat16"}, "pools": {"decode": {"quantization": "w8a8", "compile": True}}})
    colocated = parse_config({"pools": {"mode": "colocated", "decode": {"dtype": "bfloat16"}}})
    assert pool_specs(colocated)[0].model.dtype == "bfloat16"
