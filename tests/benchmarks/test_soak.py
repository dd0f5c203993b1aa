"""The soak benchmark's accounting (soak_report) on fake records and a fake ClusterStatus; its plans (no cluster)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

from benchmarks.soak import Settings, build_parser, make_plan, router_kill_outcome, rss_mb
from benchmarks.soak_report import (
    REQUIRED_KEYS,
    ProcSample,
    Record,
    build_report,
    classify,
    exit_code,
    leaked_blocks,
    leaked_by_worker,
    render,
    rss_growth,
    tally,
    worker_blocks,
)


def rec(i: int, **kw) -> Record:
    return Record(index=i, kind=kw.pop("kind", "raw"), request_id=f"r{i}", **kw)


def test_classify_each_outcome():
    assert classify(rec(0, finish_reason="length")) == "completed"
    assert classify(rec(1, finish_reason="abort")) == "completed"  # a finish_reason is an answer
    assert classify(rec(2, status="RESOURCE_EXHAUSTED")) == "failed"
    assert classify(rec(3, status="DEADLINE_EXCEEDED", deadline_s=1.0)) == "failed"
    assert classify(rec(4, cancel_sent=True, status="CANCELLED")) == "cancelled"
    assert classify(rec(5, cancel_sent=True)) == "cancelled"
    # Cancelled too late: it had already finished.
    assert classify(rec(6, cancel_sent=True, finish_reason="length")) == "completed"
    # CANCELLED that this client did not ask for: the server ended it, with a status.
    assert classify(rec(7, status="CANCELLED")) == "failed"
    # Lost: hung past its bound, or a stream that ended with neither finish_reason nor status.
    assert classify(rec(8, hung=True)) == "lost"
    assert classify(rec(9, hung=True, cancel_sent=True)) == "lost"
    assert classify(rec(10, tokens=3)) == "lost"


def test_tally_counts_and_oddities():
    records = [
        rec(0, finish_reason="length", max_tokens=4, tokens=4, attempts=2),
        rec(1, finish_reason="length", max_tokens=8, tokens=5),  # short
        rec(2, finish_reason="stop"),
        rec(3, status="UNAVAILABLE"),
        rec(4, status="UNAVAILABLE"),
        rec(5, kind="invalid:max_tokens_zero", status="INVALID_ARGUMENT"),
        rec(6, kind="invalid:bad_role", finish_reason="length"),  # accepted: wrong
        rec(7, cancel_sent=True, status="CANCELLED"),
        rec(8),
        rec(9, hung=True),
    ]
    t = tally(records)
    assert (t["completed"], t["failed"], t["cancelled"], t["lost"]) == (4, 3, 1, 2)
    assert t["requests"] == 10
    assert t["failed_by_status"] == {"INVALID_ARGUMENT": 1, "UNAVAILABLE": 2}
    assert t["finish_reasons"] == {"length": 3, "stop": 1}
    assert t["lost_request_ids"] == ["r8", "r9"]
    assert t["invalid_not_refused"] == ["r6"]
    assert t["retried"] == 1
    assert t["short_completions"] == 1


def fake_status(workers_by_kind: dict[str, list[dict]]):
    pools = [SimpleNamespace(kind=kind, workers=[SimpleNamespace(alive=True, running=0, waiting=0, **w) for w in ws])
             for kind, ws in workers_by_kind.items()]
    return SimpleNamespace(pools=pools)


def test_leaked_blocks_from_status():
    status = fake_status({
        "prefill": [{"worker_id": "prefill-0", "used_blocks": 0, "free_blocks": 256, "num_blocks": 256},
                    {"worker_id": "prefill-1", "used_blocks": 3, "free_blocks": 253, "num_blocks": 256}],
        "decode": [{"worker_id": "decode-0", "used_blocks": 0, "free_blocks": 500, "num_blocks": 512},  # free says 12
                   {"worker_id": "decode-2", "used_blocks": 0, "free_blocks": 512, "num_blocks": 512}],
    })
    rows = worker_blocks(status)
    assert [r["kind"] for r in rows] == ["prefill", "prefill", "decode", "decode"]
    assert leaked_by_worker(rows) == {"prefill-0": 0, "prefill-1": 3, "decode-0": 12, "decode-2": 0}
    assert leaked_blocks(rows) == 15
    clean = [{"worker_id": "x", "used_blocks": 0, "free_blocks": 8, "num_blocks": 8}]
    assert leaked_blocks(clean) == 0


def test_rss_growth_marks_the_killed_worker_replaced():
    samples = [ProcSample("router", 1, 100.0, 112.5), ProcSample("decode-0", 2, 50.0, None),
               ProcSample("decode-2", 3, 48.0, 49.04), ProcSample("prefill-0", 4, None, 60.0)]
    g = rss_growth(samples, {"decode-0": "decode-2"})
    assert g == {"router": 12.5, "decode-0": "replaced by decode-2", "decode-2": 1.0, "prefill-0": None}


def test_rss_mb_reads_this_process_and_none_for_gone():
    import os

    assert rss_mb(os.getpid()) > 1.0
    assert rss_mb(2**22 + 12345) is None


def report_for(records, leaked_rows, kill):
    samples = [ProcSample("router", 1, 100.0, 101.0), ProcSample("decode-0", 2, 50.0, None)]
    return build_report(records, leaked_rows, samples, kill, duration_s=60.0, settle_s=1.0, model="m", pools="p")


def test_report_keys_json_and_exit_code():
    kill = {"requested": True, "kind": "decode", "worker_id": "decode-0", "pid": 2, "at_s": 20.0,
            "replacement_id": "decode-2", "back_to_size_s": 4.2, "inflight_at_kill": 5}
    clean_rows = [{"worker_id": "decode-2", "kind": "decode", "used_blocks": 0, "free_blocks": 8, "num_blocks": 8}]
    good = report_for([rec(0, finish_reason="length"), rec(1, status="RESOURCE_EXHAUSTED"),
                       rec(2, cancel_sent=True)], clean_rows, kill)
    for key in REQUIRED_KEYS:
        assert key in good
    assert (good["completed"], good["failed"], good["lost"], good["leaked_blocks"]) == (1, 1, 0, 0)
    assert good["cancelled"] == 1
    assert good["rss_growth_mb"] == {"router": 1.0, "decode-0": "replaced by decode-2"}
    assert json.loads(json.dumps(good))["kill"]["replacement_id"] == "decode-2"
    assert exit_code(good) == 0
    assert "replaced by decode-2" in render(good)

    lost = report_for([rec(0, hung=True)], clean_rows, kill)
    assert lost["lost"] == 1 and exit_code(lost) == 1
    leaky_rows = [{**clean_rows[0], "used_blocks": 2, "free_blocks": 6}]
    leaky = report_for([rec(0, finish_reason="length")], leaky_rows, kill)
    assert leaky["leaked_blocks"] == 2 and exit_code(leaky) == 1
    no_kill = report_for([rec(0, finish_reason="length")], clean_rows, {"requested": True, "error": "boom"})
    assert exit_code(no_kill) == 1
    assert "NOT DONE" in render(no_kill)


class FakePrompts:
    max_model_len = 64

    def text(self, n: int) -> str:
        return "x" * n


def test_make_plan_mix_is_seeded_and_mixed():
    s = Settings(duration_s=1, invalid_frac=0.1, cancel_frac=0.2, deadline_frac=0.2)
    a = [make_plan(i, random.Random(i), s, FakePrompts()) for i in range(300)]
    b = [make_plan(i, random.Random(i), s, FakePrompts()) for i in range(300)]
    assert [p.kwargs for p in a] == [p.kwargs for p in b]
    kinds = {p.kind.split(":")[0] for p in a}
    assert kinds == {"raw", "chat", "invalid"}
    assert any(p.cancel_after_s is not None for p in a) and any(p.deadline_s is not None for p in a)
    for p in a:
        if p.kind == "chat":
            assert p.kwargs["messages"][-1]["role"] == "user" and "prompt" not in p.kwargs
        elif p.kind == "raw":
            lo, hi = s.output_tokens
            assert lo <= p.kwargs["max_tokens"] <= hi and p.kwargs["ignore_eos"]


def test_parser_defaults():
    args = build_parser().parse_args(["--quick", "--json", "/tmp/x.json"])
    assert args.quick and args.duration_s is None and args.kill == "decode" and args.model == "builtin:tiny-llama"


def test_router_kill_outcome_says_whether_a_failure_had_streamed():
    assert router_kill_outcome(rec(1, status="UNAVAILABLE", first_token_at=1.0, tokens=3)) == \
        "failed:UNAVAILABLE:after the first token"
    assert router_kill_outcome(rec(2, status="UNAVAILABLE")) == "failed:UNAVAILABLE:before the first token"
    assert router_kill_outcome(rec(3, finish_reason="length", client_retries=1)) == "completed"


def test_a_router_kill_without_a_restart_fails_the_run_and_its_victim_is_reported_replaced():
    kill = {"requested": False}
    router_kill = {"requested": True, "replica": "router-1", "pid": 7, "carried": 3}
    samples = [ProcSample("router-1", 7, 100.0, None)]
    report = build_report([rec(1, finish_reason="length")], [], samples, kill, router_kill=router_kill)
    assert exit_code(report) == 1  # not back
    assert report["rss_growth_mb"]["router-1"] == "replaced by router-1#2"
    report["router_kill"]["back_s"] = 3.0
    assert exit_code(report) == 0
    assert "router kill: router-1" in render(report)
