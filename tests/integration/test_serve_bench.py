"""benchmarks/serve.py against a real tiny cluster: a short constant-rate sweep
end to end, its JSON, markdown and plots."""

from __future__ import annotations

import json

from benchmarks import serve
from benchmarks.deployments import make_config, running


def test_serve_bench_constant_rate_sweep(ray_head, tmp_path, capsys):
    out = tmp_path / "bench"
    with running(make_config()) as (_, address):
        rc = serve.main(["--address", address, "--model", "auto", "--workload", "mixed", "--num-requests", "8",
                         "--seed", "3", "--short-input", "16:32", "--short-output", "4:8", "--long-input", "128",
                         "--long-output", "6", "--arrival", "constant", "--rates", "4,8", "--warmup", "1",
                         "--ttft-slo-ms", "5000", "--tpot-slo-ms", "1000", "--json", str(out / "r.json"),
                         "--markdown", str(out / "r.md"), "--plots", str(out / "plots"), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "r.json").read_text())
    assert set(report) == {"config", "workload", "slo", "runs", "goodput", "environment"}
    assert report["config"]["model"] == "builtin:tiny-llama"
    assert report["workload"]["kinds"] == {"long": 2, "short": 6}
    assert [run["arrival"] for run in report["runs"]] == [{"kind": "constant", "rate": 4.0},
                                                          {"kind": "constant", "rate": 8.0}]
    for run in report["runs"]:
        s = run["summary"]
        assert s["num_ok"] == 8 and s["errors"] == {} and s["length_mismatches"] == 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(s[key]) == {"n", "mean", "p50", "p90", "p99", "max"} and s[key]["p50"] > 0
        assert s["request_throughput"] > 0 and s["output_token_throughput"] > 0
        assert s["server_mean"]["prefill_ms"] > 0 and s["server_mean"]["transfer_ms"] >= 0
        assert set(s["attainment"]) == {"both", "ttft", "tpot"}
        for rec in run["records"]:
            # Exact lengths: the server counted the same prompt, and sent exactly the tokens asked for.
            assert rec["ok"] and rec["finish_reason"] == "length"
            assert rec["tokens_received"] == rec["completion_tokens"] == rec["output_tokens"]
            assert rec["prompt_tokens"] == rec["input_tokens"]
    assert set(report["goodput"]) >= {"rate", "lower_bound", "none_met", "bracket", "x"}
    md = (out / "r.md").read_text()
    assert "| constant 4 req/s | 8/8 |" in md and "| constant 8 req/s | 8/8 |" in md
    for name in ("latency_cdf.png", "attainment.png"):
        assert (out / "plots" / name).stat().st_size > 1000
