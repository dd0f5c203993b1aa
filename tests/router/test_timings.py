"""The final response's Timings, filled from a request's trace, and the
client's --timeline rendering of them."""

from __future__ import annotations

import pytest

from observability.stages import TIMINGS_FIELDS, RequestPath, Stage, stage_seconds
from protos import serving_pb2
from router.client import format_stages
from router.request_runner import RequestTrace
from router.server import fill_timings

T0 = 1_700_000_000.0


def trace() -> RequestTrace:
    t = RequestTrace(received=T0)
    t.new_attempt()
    t.admitted, t.reserved, t.prefill_queued = T0 + 0.001, T0 + 0.003, T0 + 0.004
    t.prefill_start, t.prefill_end = T0 + 0.010, T0 + 0.050
    t.transfer_start, t.transfer_end, t.transfer_bytes = T0 + 0.051, T0 + 0.071, 4096
    t.decode_queued, t.decode_start = T0 + 0.080, T0 + 0.110
    t.prefill_worker, t.decode_worker = "prefill-0", "decode-1"
    t.first_token, t.token_times, t.num_output_tokens = T0 + 0.060, [T0 + 0.060, T0 + 0.300, T0 + 0.560], 3
    t.finished = T0 + 0.560
    return t


def test_timings_carry_every_stage_and_stamp():
    t = trace()
    pb = serving_pb2.Timings()
    fill_timings(pb, t)
    stages = stage_seconds(t)
    for stage in Stage:
        assert getattr(pb, TIMINGS_FIELDS[stage]) == pytest.approx(stages[stage] * 1000, abs=1e-3), stage
    assert pb.decode_ms == pytest.approx(500, abs=1e-3) and pb.slowest_stage == "decode"
    assert pb.ttft_ms == pytest.approx(60, abs=1e-3) and pb.e2e_ms == pytest.approx(560, abs=1e-3)
    assert pb.tpot_ms == pytest.approx(250, abs=1e-3)
    assert (pb.transfer_bytes, pb.prefill_worker, pb.decode_worker, pb.attempts) == (4096, "prefill-0", "decode-1", 1)
    tl = pb.timeline
    assert tl.admitted_ms == pytest.approx(1, abs=1e-3) and tl.reserved_ms == pytest.approx(3, abs=1e-3)
    assert tl.transfer_end_ms == pytest.approx(71, abs=1e-3) and tl.decode_start_ms == pytest.approx(110, abs=1e-3)
    assert tl.finished_ms == pytest.approx(560, abs=1e-3)
    assert list(tl.token_ms) == pytest.approx([60, 300, 560], abs=1e-3)


def test_stages_not_reached_are_zero_and_a_retry_restamps():
    t = trace()
    t.new_attempt()  # the retry has not reached its worker yet
    pb = serving_pb2.Timings()
    fill_timings(pb, t)
    assert pb.attempts == 2 and pb.transfer_bytes == 0
    assert pb.prefill_ms == pb.transfer_ms == pb.decode_queue_ms == 0.0 and pb.queue_ms == 0.0
    assert pb.timeline.reserved_ms == 0.0 and pb.timeline.admitted_ms == pytest.approx(1, abs=1e-3)
    assert pb.slowest_stage == "decode"


def test_timings_say_which_path_and_what_the_caches_saved():
    t = trace()
    t.path, t.prefill_cached_tokens, t.decode_cached_tokens, t.transfer_bytes_saved = (
        RequestPath.DISAGGREGATED, 48, 32, 8192)
    pb = serving_pb2.Timings()
    fill_timings(pb, t)
    assert (pb.path, pb.prefill_cached_tokens, pb.decode_cached_tokens, pb.transfer_bytes_saved) == (
        "disaggregated", 48, 32, 8192)
    assert "path: disaggregated" in format_stages(pb)
    t.new_attempt()  # a retry starts over: no path or savings until it runs
    assert (t.path, t.prefill_cached_tokens, t.decode_cached_tokens, t.transfer_bytes_saved) == (None, 0, 0, 0)


def test_client_timeline_lists_every_stage_and_marks_the_slowest():
    pb = serving_pb2.Timings()
    fill_timings(pb, trace())
    text = format_stages(pb)
    lines = text.splitlines()
    assert lines[0] == "stages:"
    assert [line.split()[0] for line in lines[1:1 + len(Stage)]] == [s.value for s in Stage]
    assert [line for line in lines if "<- slowest" in line] == [next(x for x in lines if x.split()[0] == "decode")]
    assert "transfer" in text and "KV moved: 4096 bytes" in text and "attempts: 1" in text
