"""Prefill pool on one node, decode pool on another (two-node local cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.reference import compare_greedy

REPO = Path(__file__).resolve().parents[2]


def run_two_nodes(*args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "tests.integration.two_node_main", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_pools_on_separate_nodes(tiny_model):
    run = subprocess.run([sys.executable, "-m", "tests.integration.two_node_main", "gloo"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["distinct"]
    assert all("prefill_node" in r for r in seen["prefill_nodes"])
    assert all("decode_node" in r for r in seen["decode_nodes"])
    ids = tiny_model.tokenizer("two nodes, one answer", add_special_tokens=False)["input_ids"]
    compare_greedy(tiny_model.model, ids, seen["tokens"], 10, ignore_eos=True)


def test_kv_host_auto_advertises_each_nodes_own_address(tiny_model):
    # Two node IPs on one machine: 127.0.0.1 (head, prefill) and 127.0.0.2 (decode).
    seen = run_two_nodes("gloo", "auto")
    assert seen["distinct"]
    by_kind = {e["kind"]: e for e in seen["endpoints"]}
    assert (by_kind["prefill"]["node_ip"], by_kind["decode"]["node_ip"]) == ("127.0.0.1", "127.0.0.2")
    assert all(e["advertised"] == e["node_ip"] for e in seen["endpoints"]), seen["endpoints"]
    ids = tiny_model.tokenizer("two nodes, one answer", add_special_tokens=False)["input_ids"]
    compare_greedy(tiny_model.model, ids, seen["tokens"], 10, ignore_eos=True)
