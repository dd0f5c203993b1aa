"""The launch path a user takes: `ray job submit -- python -m cluster.launch`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import grpc
import yaml

from cluster.config import load_config
from cluster.launch import job_runtime_env
from router.client import Client
from cluster.local_ray import free_port, ray_bin
from tests.reference import compare_greedy


def job_cli(head, command: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([ray_bin(), "job", command, "--address", head.dashboard_url, *args], capture_output=True,
                          text=True, timeout=timeout, env=head.env())


def test_ray_job_submit_serves_and_stops(ray_head, tiny_model, tmp_path):
    port = free_port()
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "builtin:tiny-llama"},
        "pools": {"ratio": "1:1", "replicas": 2, "prefill": {"num_cpus": 0.5, "num_blocks": 128},
                  "decode": {"num_cpus": 0.5, "num_blocks": 256}},
        "kvtransfer": {"backend": "gloo"},
        "router": {"host": "127.0.0.1", "port": port, "http_port": 0},
        "ray": {"namespace": "test-job-submit"},
    }))
    runtime_env = json.dumps(job_runtime_env(load_config(config)))
    for _ in range(30):  # a fresh head's dashboard agent takes a while to accept jobs
        sub = job_cli(ray_head, "submit", "--no-wait", "--runtime-env-json", runtime_env, "--", sys.executable, "-m",
                      "cluster.launch", "--config", str(config))
        if "No available agent" not in sub.stderr + sub.stdout:
            break
        time.sleep(2)
    assert sub.returncode == 0, sub.stderr
    job_id = re.search(r"Job '([^']+)' submitted successfully", sub.stdout + sub.stderr).group(1)
    client = Client(f"127.0.0.1:{port}")
    try:
        try:
            client.wait_ready(timeout_s=300)
        except TimeoutError:
            raise AssertionError("router never SERVING; job logs:\n" + job_cli(ray_head, "logs", job_id).stdout[-3000:])
        out = client.generate("hello from a ray job", max_tokens=10, ignore_eos=True)
        ids = tiny_model.tokenizer("hello from a ray job", add_special_tokens=False)["input_ids"]
        compare_greedy(tiny_model.model, ids, out.token_ids, 10, ignore_eos=True)
        # A request in flight when `ray job stop` comes finishes: the SIGTERM drains the router.
        in_flight: dict = {}
        streamer = threading.Thread(target=lambda: in_flight.update(
            out=Client(f"127.0.0.1:{port}").generate("drain me", max_tokens=300, ignore_eos=True)))
        streamer.start()
        time.sleep(0.5)
    finally:
        stop = job_cli(ray_head, "stop", job_id, timeout=300)
    assert stop.returncode == 0, stop.stderr
    streamer.join(timeout=120)
    assert len(in_flight["out"].token_ids) == 300 and in_flight["out"].finish_reason == "length"
    deadline = time.monotonic() + 120
    while "stopped" not in job_cli(ray_head, "status", job_id).stdout.lower() and time.monotonic() < deadline:
        time.sleep(1)
    assert "stopped" in job_cli(ray_head, "status", job_id).stdout.lower()
    try:
        client.generate("anyone there?", max_tokens=2)
        raise AssertionError("the router still answers after ray job stop")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
    logs = job_cli(ray_head, "logs", job_id).stdout
    assert "splitserve: serving builtin:tiny-llama" in logs
    assert "splitserve: stopping" in logs, logs[-2000:]  # SIGTERM from `ray job stop` drained the router
    assert "splitserve: stopped" in logs, logs[-2000:]  # ... and it exited by itself, not by SIGKILL
    # The pool manager and the workers are detached (they outlive a killed entrypoint): the stop ended them.
    from cluster.pool_manager import named_actors

    assert named_actors("test-job-submit") == []
