"""Arrival processes (statistics, exact schedules) and the driver against an
in-process fake ``Serving`` server (timing, errors, concurrency, turn order),
and the CLI's outputs against the fake in a subprocess. The driver against a real cluster: tests/integration/test_serve_bench.py."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.loadgen import (Burst, ConstantRate, FixedConcurrency, Poisson, make_client, run_sweep, run_trace,
                                with_rate)
from benchmarks.slo import SLO
from benchmarks.workloads import BenchRequest
from tests.benchmarks.fake_serving import FAIL_TOKENS, GAP_S, start_fake

REPO = Path(__file__).resolve().parents[2]


def requests(outs: list[int]) -> list[BenchRequest]:
    return [BenchRequest(i, "short", 5, n, prompt=f"prompt {i}") for i, n in enumerate(outs)]


def drive(reqs, arrival, **kw):
    async def go():
        server, address, fake = await start_fake()
        try:
            return await run_trace(address, reqs, arrival, **kw), fake
        finally:
            await server.stop(None)

    return asyncio.run(go())


# -- arrival processes ---------------------------------------------------------------------------------------------

def test_poisson_statistics_and_seeding():
    times = Poisson(5.0, seed=1).schedule(20000)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.03)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    # Counts in 1 s windows are Poisson(5): variance equals mean.
    counts = [0] * int(times[-1])
    for t in times:
        if int(t) < len(counts):
            counts[int(t)] += 1
    assert statistics.fmean(counts) == pytest.approx(5.0, rel=0.05)
    assert statistics.pvariance(counts) == pytest.approx(5.0, rel=0.15)
    assert Poisson(5.0, seed=1).schedule(50) == times[:50]
    assert Poisson(5.0, seed=2).schedule(50) != times[:50]


def test_constant_burst_and_concurrency_schedules():
    assert ConstantRate(4.0).schedule(4) == [0.0, 0.25, 0.5, 0.75]
    assert Burst().schedule(3) == [0.0, 0.0, 0.0] and Burst().rate is None
    b = Burst.at_rate(3, 2.0)  # 3 at once every 1.5 s
    assert b.schedule(7) == [0.0, 0.0, 0.0, 1.5, 1.5, 1.5, 3.0] and b.rate == 2.0
    assert Burst(2, 0.5).schedule(3) == [0.0, 0.0, 0.5]
    assert FixedConcurrency(4).schedule(10) is None and FixedConcurrency(4).rate is None
    assert with_rate(ConstantRate(1.0), 3.0) == ConstantRate(3.0)
    assert with_rate(Burst(4, 1.0), 2.0) == Burst(4, 2.0)
    for bad in (lambda: Poisson(0), lambda: Burst(0, 1.0), lambda: Burst(2, 0.0), lambda: FixedConcurrency(0)):
        with pytest.raises(ValueError):
            bad()


# -- the driver --------------------------------------------------------------------------------------------------

def test_constant_rate_run_records_every_token():
    outs = [3, 5, 1, FAIL_TOKENS, 4, 2]
    records, fake = drive(requests(outs), ConstantRate(50.0), request_id_prefix="t")
    assert [r.request_id for r in records] == [f"t-{i}" for i in range(6)]
    for i, r in enumerate(records):
        assert r.scheduled_s == pytest.approx(i / 50.0)
        assert r.scheduled_s <= r.start_s < r.scheduled_s + 0.2  # sent on time (tolerant: a busy machine)
        if outs[i] == FAIL_TOKENS:
            assert r.status == "RESOURCE_EXHAUSTED" and not r.ok and r.error_kind == "RESOURCE_EXHAUSTED"
            continue
        assert r.ok and r.finish_reason == "length" and r.tokens_received == outs[i] == r.completion_tokens
        assert len(r.token_times_s) == outs[i] and len(r.itls_s) == outs[i] - 1
        assert all(g >= 0 for g in r.itls_s)  # client-side gaps: responses read back to back may be ~0 apart
        assert r.ttft_s > 0 and r.e2e_s >= r.ttft_s and r.e2e_s >= outs[i] * GAP_S  # the server sleeps per token
        assert r.server["transfer_ms"] == 3.0 and r.prompt_tokens == 7
        sent = fake.requests[r.request_id]
        assert sent.prompt == f"prompt {i}" and sent.sampling.max_tokens == outs[i] and sent.sampling.ignore_eos


def test_fixed_concurrency_keeps_c_in_flight():
    records, fake = drive(requests([6] * 12), FixedConcurrency(3))
    assert fake.max_in_flight == 3
    assert all(r.ok for r in records)
    # Closed loop: a request is sent when an earlier one ends, so the 4th starts after the first ends.
    first_end = min(r.end_s for r in records[:3])
    assert records[3].start_s >= first_end - 1e-3


def test_burst_sends_all_at_once():
    records, fake = drive(requests([4] * 8), Burst())
    assert fake.max_in_flight == 8
    assert max(r.start_s for r in records) < 0.05


def test_turns_run_in_order_and_replay_answers():
    msgs = lambda *texts: tuple({"role": role, "content": t} for role, t in zip(["user", "assistant"] * 3, texts))
    reqs = [BenchRequest(0, "multi-turn", 5, 3, messages=msgs("q0"), conversation=0, turn=0),
            BenchRequest(1, "multi-turn", 5, 2, messages=msgs("p0"), conversation=1, turn=0),
            BenchRequest(2, "multi-turn", 9, 2, messages=msgs("q0", "stand-in", "q1"), conversation=0, turn=1,
                         depends_on=0),
            BenchRequest(3, "multi-turn", 9, 2, messages=msgs("q0", "x", "q1", "y", "q2"), conversation=0, turn=2,
                         depends_on=2)]
    records, fake = drive(reqs, Burst(), replay_answers=True, request_id_prefix="m")
    assert all(r.ok for r in records)
    assert records[2].start_s >= records[0].end_s and records[3].start_s >= records[2].end_s
    assert records[2].ready_s >= records[0].end_s
    sent = [m.content for m in fake.requests["m-3"].chat.messages]
    assert sent == ["q0", "<m-0:0><m-0:1><m-0:2>", "q1", "<m-2:0><m-2:1>", "q2"]
    # Without replay the stand-in answers are sent as they are.
    _, fake = drive(reqs, Burst(), request_id_prefix="n")
    assert [m.content for m in fake.requests["n-2"].chat.messages] == ["q0", "stand-in", "q1"]


def test_unreachable_server_is_an_error_per_request():
    async def go():
        return await run_trace("127.0.0.1:1", requests([2, 2]), ConstantRate(100.0), timeout_s=2.0)

    records = asyncio.run(go())
    assert [r.status for r in records] == ["UNAVAILABLE", "UNAVAILABLE"]


def test_make_client_passes_tls_and_token_only_when_given(monkeypatch):
    import benchmarks.loadgen as loadgen

    calls = []

    class OldClient:  # a client without the TLS/token options
        def __init__(self, address, timeout_s):
            calls.append((address, timeout_s))

    monkeypatch.setattr(loadgen, "AsyncClient", OldClient)
    make_client("a:1", 5.0)
    assert calls == [("a:1", 5.0)]
    with pytest.raises(RuntimeError, match="tls_ca"):
        make_client("a:1", 5.0, tls_ca="ca.pem")

    class NewClient:
        def __init__(self, address, timeout_s, *, tls_ca=None, token=None):
            calls.append((address, timeout_s, tls_ca, token))

    monkeypatch.setattr(loadgen, "AsyncClient", NewClient)
    make_client("a:1", 5.0, tls_ca="ca.pem", token="s3cret")
    assert calls[-1] == ("a:1", 5.0, "ca.pem", "s3cret")


def test_run_sweep_summaries():
    async def go():
        server, address, fake = await start_fake()
        try:
            return await run_sweep(address, requests([4] * 6), [ConstantRate(40.0), FixedConcurrency(2)],
                                   SLO(ttft_ms=1000, tpot_ms=1000), warmup=1)
        finally:
            await server.stop(None)

    runs = asyncio.run(go())
    assert [r.label for r in runs] == ["constant 40 req/s", "concurrency 2"]
    assert runs[0].x == 40.0 and runs[1].x == pytest.approx(runs[1].summary["request_throughput"])
    for run in runs:
        assert run.summary["num_ok"] == 6 and run.summary["attainment"]["both"] == 1.0
        assert run.summary["output_tokens"] == 24 and run.summary["length_mismatches"] == 0


# -- the CLI, against the fake server in another thread ------------------------------------------------------------

@pytest.fixture
def fake_address():
    """The fake server in its own process: the CLI runs its own event loops here."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.benchmarks.fake_serving"], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_writes_json_markdown_and_plots(fake_address, tmp_path, capsys):
    from benchmarks import serve

    rc = serve.main(["--address", fake_address, "--workload", "mixed", "--num-requests", "10", "--seed", "1",
                     "--short-input", "8:16", "--short-output", "2:5", "--long-input", "64", "--long-output", "3",
                     "--arrival", "poisson", "--rates", "20,40", "--ttft-slo-ms", "500", "--tpot-slo-ms", "500",
                     "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"),
                     "--plots", str(tmp_path / "plots"), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) == {"config", "workload", "slo", "runs", "goodput", "environment"}
    assert report["config"]["model"] == "builtin:tiny-llama"  # --model auto asked the router
    assert report["workload"]["kinds"] == {"long": 2, "short": 8}
    assert [r["x"] for r in report["runs"]] == [20.0, 40.0]
    assert report["goodput"]["rate"] == 40.0 and report["goodput"]["lower_bound"]
    for run in report["runs"]:
        assert len(run["records"]) == 10
        assert all(r["tokens_received"] == r["output_tokens"] for r in run["records"])
    md = (tmp_path / "r.md").read_text()
    assert "| poisson 20 req/s | 10/10 |" in md and "Goodput" in md
    assert md in capsys.readouterr().out
    for name in ("latency_cdf.png", "attainment.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_inconsistent_arrival_flags(capsys):
    from benchmarks import serve

    for argv in (["--arrival", "concurrency", "--rates", "1"], ["--arrival", "burst", "--rates", "1"],
                 ["--concurrency", "2"], ["--rates", "0"]):
        with pytest.raises(SystemExit) as e:
            serve.main(argv)
        assert e.value.code == 2
