"""Each worker kind's status() is one WorkerStatus carrying its own counters,
and it survives the trip through Ray's serialization unchanged."""

from __future__ import annotations

import pickle

import pytest

from engine.model_loader import TINY_MODEL
from engine.step_stats import StepStatsSnapshot
from tests.local_workers import make_workers
from worker_common.worker_status import KVTransferStats, WorkerStatus


@pytest.fixture(scope="module")
def workers():
    made = make_workers(TINY_MODEL, num_blocks=32)
    yield made
    for w in made:
        w.shutdown()


def test_every_kind_reports_a_worker_status(workers):
    prefill, decode, colocated = workers
    prefill.tokens_prefilled, prefill.transfer_seconds = 12, 0.5
    decode.tokens_generated = 7
    for w in workers:
        s = w.status()
        assert isinstance(s, WorkerStatus) and isinstance(s.step_stats, StepStatsSnapshot)
        assert isinstance(s.kv_transfer, KVTransferStats)
        assert (s.worker_id, s.kind) == (w.worker_id, w.kind)
        assert (s.num_blocks, s.free_blocks, s.used_blocks, s.running, s.waiting, s.reserved) == (32, 32, 0, 0, 0, 0)
        assert s.step_stats.peak_flops_per_s and s.step_stats.steps == 0
        assert pickle.loads(pickle.dumps(s)) == s
    p, d, c = (w.status() for w in workers)
    assert (p.tokens_prefilled, p.tokens_processed, p.kv_transfer.seconds_sent, p.held) == (12, 12, 0.5, 0)
    assert (d.tokens_generated, d.tokens_processed, d.kv_transfer.seconds_sent) == (7, 7, None)
    assert (c.kind, c.tokens_generated, c.kv_transfer.seconds_sent) == ("colocated", 0, None)
