"""``make run``: start a local Ray head, submit the cluster with ``ray job
submit``, wait until the router is SERVING, stream a few demo answers.

Idempotent: a running head and a serving router are reused. The cluster
keeps running afterwards; ``make stop`` (``python -m cluster.demo --stop``)
stops the job and the head.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc

from cluster.config import load_config
from cluster.launch import job_runtime_env
from router.client import Client, Completion

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = "http://127.0.0.1:8265"
GCS_PORT = 6379
JOB_ID_FILE = REPO / ".splitserve-job"
DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me one tip for sleeping better.",
)


def ray_bin() -> str:
    """The ``ray`` CLI of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else shutil.which("ray") or "ray"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["RAY_AUTH_MODE"] = "token"
    # A single-machine demo: keep Ray on 127.0.0.1 rather than the host's routable address.
    e["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    e["RAY_ADDRESS"] = DASHBOARD  # for the job CLI
    return e


def head_running() -> bool:
    r = subprocess.run([ray_bin(), "status", "--address", f"127.0.0.1:{GCS_PORT}"], env=env(),
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0


def start_head(num_cpus: int) -> None:
    cmd = [ray_bin(), "start", "--head", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
           f"--port={GCS_PORT}", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats"]
    subprocess.run(cmd, env=env(), check=True, timeout=180)


def submit(config: str) -> str:
    path = (REPO / config).resolve()
    runtime_env = json.dumps(job_runtime_env(load_config(path)))  # lets `ray job stop` drain, not SIGKILL at 3 s
    cmd = [ray_bin(), "job", "submit", "--address", DASHBOARD, "--no-wait", "--runtime-env-json", runtime_env, "--",
           sys.executable, "-m", "cluster.launch", "--config", str(path)]
    for _ in range(30):  # a fresh head's dashboard agent takes a while to accept jobs
        run = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120, cwd=REPO)
        if "No available agent" not in run.stdout + run.stderr:
            break
        time.sleep(2)
    if run.returncode != 0:
        raise RuntimeError(f"ray job submit failed:\n{run.stdout}\n{run.stderr}")
    out = run.stdout
    job_id = next((line.split("'")[1] for line in out.splitlines() if "submitted successfully" in line), None)
    if job_id is None:
        raise RuntimeError(f"could not read the job id from:\n{out}")
    JOB_ID_FILE.write_text(job_id)
    return job_id


def router_serving(address: str) -> bool:
    c = Client(address)
    try:
        c.wait_ready(timeout_s=1)
        return True
    except TimeoutError:
        return False
    finally:
        c.close()


def wait_serving(address: str, job_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not router_serving(address):
        status = subprocess.run([ray_bin(), "job", "status", "--address", DASHBOARD, job_id], env=env(),
                                capture_output=True, text=True, timeout=60).stdout
        if "FAILED" in status or "STOPPED" in status:
            logs = subprocess.run([ray_bin(), "job", "logs", "--address", DASHBOARD, job_id], env=env(),
                                  capture_output=True, text=True, timeout=60).stdout
            raise RuntimeError(f"job {job_id} ended before serving:\n{logs[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"router at {address} not SERVING after {timeout_s:.0f} s")
        time.sleep(2)


def demo(address: str, max_tokens: int) -> None:
    client = Client(address)
    try:
        for q in DEMO_QUESTIONS:
            print(f"\n> {q}\n", end="", flush=True)
            c = Completion()
            for resp in client.stream(messages=[{"role": "user", "content": q}], max_tokens=max_tokens):
                c.add(resp)
                print(resp.text, end="", flush=True)
            t = c.timings
            print(f"\n  [{c.usage.completion_tokens} tokens, finish={c.finish_reason}, TTFT {t.ttft_ms:.0f} ms, "
                  f"TPOT {t.tpot_ms:.1f} ms; {t.prefill_worker} -> {t.decode_worker}, "
                  f"KV {t.transfer_bytes / 1e6:.1f} MB in {t.transfer_ms:.1f} ms]")
    finally:
        client.close()


def stop() -> None:
    if JOB_ID_FILE.exists():
        subprocess.run([ray_bin(), "job", "stop", "--address", DASHBOARD, JOB_ID_FILE.read_text().strip()],
                       env=env(), timeout=120)
        JOB_ID_FILE.unlink()
    subprocess.run([ray_bin(), "stop"], env=env(), timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/local.yaml")
    ap.add_argument("--address", default="127.0.0.1:50051", help="the router address in the config")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--stop", action="store_true", help="stop the job and the Ray head")
    args = ap.parse_args(argv)
    if args.stop:
        stop()
        return 0
    if not router_serving(args.address):
        if not head_running():
            print("starting a local Ray head (2 CPUs, 127.0.0.1) ...", flush=True)
            start_head(num_cpus=2)
        job_id = submit(args.config)
        print(f"submitted job {job_id}: python -m cluster.launch --config {args.config}; waiting for the router ...",
              flush=True)
        wait_serving(args.address, job_id, args.timeout)
    print(f"router SERVING on {args.address}", flush=True)
    try:
        demo(args.address, args.max_tokens)
    except grpc.RpcError as e:
        print(f"demo request failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print("\nThe cluster keeps running: try `.venv/bin/python -m router.client \"your question\"`\n"
          "(add --timeline for where the time went); metrics at http://127.0.0.1:9464/metrics.\n"
          "Stop it with `make stop` (ray job stop + ray stop).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
