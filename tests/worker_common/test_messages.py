"""The router<->worker message types and the one KV shape formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.kv_cache import KVLayout, PagedKVCache
from engine.kv_handoff import KVHandoff
from worker_common.messages import (Ack, ErrorReason, KVHandoffMeta, KVPushed, PrefillResult, TokenChunk,
                                    WorkerError)

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32")


def test_kv_shape_is_what_the_cache_reads_and_the_handoff_carries():
    cache = PagedKVCache(LAYOUT, num_blocks=4, block_size=2)
    data = cache.read_tokens(torch.arange(5))
    assert tuple(data.shape) == LAYOUT.kv_shape(5)
    handoff = KVHandoff("r", LAYOUT, [1, 2, 3, 4, 5], [6], 7, data)
    assert handoff.nbytes == 5 * LAYOUT.bytes_per_token
    back = KVHandoff.from_bytes(handoff.to_bytes())
    assert tuple(back.data.shape) == LAYOUT.kv_shape(5) and torch.equal(back.data, data)


def test_handoff_metadata_travels_whole_and_rebuilds_the_handoff():
    data = torch.randn(LAYOUT.kv_shape(4))
    sent = KVHandoff("prefill-side", LAYOUT, [10, 11, 12], [13, 14], 99, data)
    meta = KVHandoffMeta.of(sent)
    assert meta == KVHandoffMeta(LAYOUT, (10, 11, 12), (13, 14), 99)
    got = meta.with_data("decode-side", data)
    assert (got.request_id, got.layout, got.prompt_token_ids, got.output_token_ids, got.seed) == (
        "decode-side", LAYOUT, [10, 11, 12], [13, 14], 99)
    assert got.num_tokens == 4 and got.data is data
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.seed = 1  # type: ignore[misc]


def test_messages_are_frozen_values():
    chunk = TokenChunk((1, 2), "ab", True, "length")
    pushed = KVPushed(KVHandoffMeta(LAYOUT, (1,), (2,), 0), 96, 1.0, 2.0)
    result = PrefillResult("prefill-0", chunk, 0.5, 0.6, 0.7, pushed)
    for msg in (chunk, pushed, result, Ack(1.0, 2.0), WorkerError(ErrorReason.ABORTED)):
        assert dataclasses.is_dataclass(msg)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, dataclasses.fields(msg)[0].name, None)
    assert result == PrefillResult("prefill-0", TokenChunk((1, 2), "ab", True, "length"), 0.5, 0.6, 0.7, pushed)


def test_worker_error_says_its_reason_and_detail():
    assert str(WorkerError(ErrorReason.ABORTED)) == "aborted"
    err = WorkerError(ErrorReason.TRANSFER_FAILED, "timed out", kv_held=True)
    assert str(err) == "transfer_failed: timed out" and err.kv_held and err.field is None
    invalid = WorkerError(ErrorReason.INVALID_REQUEST, "exceeds the KV cache", field="prompt")
    assert invalid.field == "prompt" and not invalid.kv_held
