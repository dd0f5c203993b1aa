"""``make run``: start a local Ray head, submit the cluster with ``ray job
submit``, wait until the router is SERVING, stream a few demo answers.

Idempotent: a running head and a serving router are reused. The cluster
keeps running afterwards; ``make stop`` (``python -m cluster.demo --stop``)
stops the job this checkout submitted and the head this checkout started,
and nothing else (never ``ray stop``, which would end every Ray cluster on
the machine). Ray's token and loopback settings come from
:mod:`cluster.local_ray`, so this works in a fresh shell on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from cluster.local_ray import STATE_DIR, RayHead, RayStartError, head_answers, start_head
from cluster.submit import DEFAULT_DASHBOARD, router_serving, stop_job, submit, wait_serving
from router.client import Client, Completion

GCS_PORT = 6379
DASHBOARD_PORT = 8265
HEAD_FILE = STATE_DIR / "head.json"  # the head `make run` started: pid and addresses, for `make stop`
HEAD_LOG = STATE_DIR / "ray-head.log"
DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me one tip for sleeping better.",
)


def ensure_head(num_cpus: int) -> None:
    """Start the demo's head on the default ports unless one already answers there."""
    if head_answers(f"127.0.0.1:{GCS_PORT}"):
        return
    print(f"starting a local Ray head ({num_cpus} CPUs, 127.0.0.1:{GCS_PORT}; log {HEAD_LOG}) ...", flush=True)
    head = start_head(num_cpus, gcs_port=GCS_PORT, dashboard_port=DASHBOARD_PORT, log_path=HEAD_LOG)
    HEAD_FILE.write_text(json.dumps({"pid": head.pid, "gcs_address": head.gcs_address,
                                     "dashboard_url": head.dashboard_url, "log_path": str(head.log_path)}))


def stop_head() -> bool:
    """Stop the head this checkout started (if any); True if one was stopped."""
    if not HEAD_FILE.exists():
        return False
    saved = json.loads(HEAD_FILE.read_text())
    head = RayHead(saved["gcs_address"], saved["dashboard_url"], Path(saved["log_path"]), saved["pid"])
    was_alive = head.alive()
    head.stop()
    HEAD_FILE.unlink(missing_ok=True)
    return was_alive


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
    job_id = stop_job(DEFAULT_DASHBOARD)
    print(f"stopped job {job_id}" if job_id else "no job of this checkout was running")
    print("stopped the Ray head" if stop_head() else "no Ray head of this checkout was running")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/local.yaml")
    ap.add_argument("--address", default="127.0.0.1:50051", help="the router address in the config")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--stop", action="store_true", help="stop the job and the Ray head this checkout started")
    args = ap.parse_args(argv)
    if args.stop:
        stop()
        return 0
    try:
        if not router_serving(args.address):
            ensure_head(num_cpus=2)
            job_id = submit(args.config, DEFAULT_DASHBOARD)
            print(f"submitted job {job_id}: python -m cluster.launch --config {args.config}; waiting for the "
                  "router ...", flush=True)
            wait_serving(args.address, job_id, DEFAULT_DASHBOARD, args.timeout)
    except (RayStartError, TimeoutError) as e:
        print(f"splitserve: {e}", file=sys.stderr)
        return 1
    print(f"router SERVING on {args.address}", flush=True)
    try:
        demo(args.address, args.max_tokens)
    except grpc.RpcError as e:
        print(f"demo request failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print("\nThe cluster keeps running: try `.venv/bin/python -m router.client \"your question\"`\n"
          "(add --timeline for where the time went); metrics at http://127.0.0.1:9464/metrics\n"
          "(router replica i: port 9464 + i).\n"
          "Stop it with `make stop` (stops this checkout's job and Ray head only).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
