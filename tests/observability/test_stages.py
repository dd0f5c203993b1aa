"""Request stages: the one duration computation, the per-attempt stamps, and
the tables that tie Stage and Timeline to the proto's field names."""

from __future__ import annotations

import pytest

from observability.stages import TIMINGS_FIELDS, Stage, Timeline, stage_seconds
from protos import serving_pb2

T0 = 1_700_000_000.0


def disaggregated() -> Timeline:
    """A request that went through every stage: each gap is a distinct length."""
    return Timeline(received=T0, admitted=T0 + 0.001, reserved=T0 + 0.003, prefill_queued=T0 + 0.004,
                    prefill_start=T0 + 0.010, prefill_end=T0 + 0.050, transfer_start=T0 + 0.051,
                    transfer_end=T0 + 0.071, decode_queued=T0 + 0.080, decode_start=T0 + 0.110,
                    first_token=T0 + 0.060, finished=T0 + 0.560)


def test_each_stage_spans_its_two_stamps():
    got = stage_seconds(disaggregated())
    assert list(got) == list(Stage)  # every stage reached, in lifecycle order
    want = {Stage.QUEUE: 0.003, Stage.PREFILL_QUEUE: 0.006, Stage.PREFILL: 0.040, Stage.TRANSFER: 0.020,
            Stage.DECODE_QUEUE: 0.030, Stage.DECODE: 0.500}
    for stage, seconds in want.items():
        assert got[stage] == pytest.approx(seconds, abs=1e-6), stage


def test_colocated_queue_ends_when_the_worker_received_it():
    # No reservation in colocated mode: queue runs to the worker's receipt; no transfer.
    t = Timeline(received=T0, admitted=T0 + 0.001, prefill_queued=T0 + 0.007, prefill_start=T0 + 0.008,
                 prefill_end=T0 + 0.020, decode_queued=T0 + 0.007, decode_start=T0 + 0.020,
                 first_token=T0 + 0.021, finished=T0 + 0.100)
    got = stage_seconds(t)
    assert got[Stage.QUEUE] == pytest.approx(0.007, abs=1e-6)
    assert Stage.TRANSFER not in got
    assert got[Stage.DECODE_QUEUE] == pytest.approx(0.013, abs=1e-6)


def test_stages_not_reached_or_inverted_are_left_out():
    # A request that ended with its first token: nothing moved, nothing decoded.
    t = disaggregated()
    t.transfer_start = t.transfer_end = t.decode_queued = t.decode_start = 0.0
    t.finished = t.first_token
    got = stage_seconds(t)
    assert Stage.TRANSFER not in got and Stage.DECODE_QUEUE not in got
    assert got[Stage.DECODE] == 0.0  # reached, took no time
    # A clock step backwards between two stamps: no negative duration.
    t = disaggregated()
    t.prefill_end = t.prefill_start - 0.001
    assert Stage.PREFILL not in stage_seconds(t)
    # A request refused before any stage but the router's.
    assert stage_seconds(Timeline(received=T0)) == {}


def test_new_attempt_clears_only_the_attempt_stamps():
    t = disaggregated()
    t.new_attempt()
    assert (t.received, t.admitted, t.first_token, t.finished) == (T0, T0 + 0.001, T0 + 0.060, T0 + 0.560)
    for name in ("reserved", "prefill_queued", "prefill_start", "prefill_end", "transfer_start", "transfer_end",
                 "decode_queued", "decode_start"):
        assert getattr(t, name) == 0.0, name


def test_stage_names_are_the_proto_timings_fields():
    timings = serving_pb2.Timings.DESCRIPTOR.fields_by_name
    assert list(TIMINGS_FIELDS) == list(Stage)
    for stage, name in TIMINGS_FIELDS.items():
        assert timings[name].type == timings[name].TYPE_DOUBLE, name
        assert name == f"{stage.value}_ms"  # one name per stage, on the wire and on the metric label
    # Every per-stage duration the proto has is a Stage (numbers 10-29 are the stages' block).
    per_stage = {f.name for f in serving_pb2.Timings.DESCRIPTOR.fields if 10 <= f.number <= 29 and f.name.endswith("_ms")}
    assert per_stage == set(TIMINGS_FIELDS.values())


def test_timeline_stamps_are_the_proto_timeline_fields():
    proto = [f.name for f in serving_pb2.Timeline.DESCRIPTOR.fields if f.name != "token_ms"]
    assert sorted(proto) == sorted(f"{name}_ms" for name in Timeline.stamp_names())
