"""Submit a deployment to a running Ray cluster with ``ray job submit``, or stop it.

    python -m cluster.submit --config deploy/local.yaml [--address http://127.0.0.1:8265]
    python -m cluster.submit --stop

This is ``ray job submit -- python -m cluster.launch --config ...`` with what
it needs set by itself: the project's Ray token and loopback environment
(:mod:`cluster.local_ray`) and a ``RAY_JOB_STOP_WAIT_TIME_S`` that gives
``ray job stop`` time to drain. It waits until the router answers SERVING;
when the job fails first, the error carries the end of the job's log (the
real cause, e.g. a missing model or a taken port). The id of the submitted
job is kept in ``.splitserve/job_id`` (its config's path in
``.splitserve/job_config``) so that ``--stop`` (and ``make stop``) stop
exactly it. The job's own stop path (SIGTERM: drain, then stop the actors)
ends the deployment's detached actors; ``--stop`` then runs
``cluster.launch --teardown`` as a short job of its own, which kills any
that a killed entrypoint left behind.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from cluster.config import ClusterConfig, ConfigError, load_config
from cluster.launch import STOPPED_LINE, job_runtime_env
from cluster.local_ray import REPO, STATE_DIR, RayStartError, ray_bin, ray_env

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
JOB_ID_FILE = STATE_DIR / "job_id"
JOB_CONFIG_FILE = STATE_DIR / "job_config"
CLI_TIMEOUT_S = 120.0
AGENT_WAIT_TRIES = 30  # a fresh head's dashboard agent takes a while to accept jobs
JOB_LOG_TAIL_CHARS = 4000
# What `ray job submit` says while a fresh head's job server is still coming up.
RETRY_MARKERS = ("No available agent", "Failed to connect to Ray at address")
_SUBMITTED = re.compile(r"Job '([^']+)' submitted successfully")


def job_cli(dashboard: str, command: str, *args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``ray job <command> --address <dashboard> <args>`` with the project's Ray environment."""
    return subprocess.run([ray_bin(), "job", command, "--address", dashboard, *args], capture_output=True, text=True,
                          timeout=timeout_s, env=ray_env(), cwd=REPO)


def submit(config_path: str | Path, dashboard: str = DEFAULT_DASHBOARD) -> str:
    """Submit ``python -m cluster.launch --config <config_path>``; return the job id."""
    path = Path(config_path).resolve()
    runtime_env = json.dumps(job_runtime_env(load_config(path)))
    args = ["--no-wait", "--runtime-env-json", runtime_env, "--", sys.executable, "-m", "cluster.launch",
            "--config", str(path)]
    for _ in range(AGENT_WAIT_TRIES):
        run = job_cli(dashboard, "submit", *args)
        if not any(m in run.stdout + run.stderr for m in RETRY_MARKERS):
            break
        time.sleep(2)
    match = _SUBMITTED.search(run.stdout + run.stderr)
    if run.returncode != 0 or match is None:
        raise RayStartError(f"ray job submit failed (exit {run.returncode}):\n{run.stdout[-2000:]}\n"
                            f"{run.stderr[-2000:]}")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    JOB_ID_FILE.write_text(match.group(1))
    JOB_CONFIG_FILE.write_text(str(path))
    return match.group(1)


def router_serving(address: str) -> bool:
    """Whether the router at ``address`` answers its health check with SERVING within a second."""
    from router.client import Client

    client = Client(address)
    try:
        client.wait_ready(timeout_s=1)
        return True
    except TimeoutError:
        return False
    finally:
        client.close()


def wait_serving(address: str, job_id: str, dashboard: str, timeout_s: float) -> None:
    """Wait until the router is SERVING; raise with the job's log if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while not router_serving(address):
        status = job_cli(dashboard, "status", job_id).stdout
        if "FAILED" in status or "STOPPED" in status:
            logs = job_cli(dashboard, "logs", job_id).stdout
            raise RayStartError(f"job {job_id} ended before serving; its log ends:\n{logs[-JOB_LOG_TAIL_CHARS:]}")
        if time.monotonic() > deadline:
            logs = job_cli(dashboard, "logs", job_id).stdout
            raise TimeoutError(f"router at {address} not SERVING after {timeout_s:.0f} s; job {job_id}'s log "
                               f"ends:\n{logs[-JOB_LOG_TAIL_CHARS:]}")
        time.sleep(2)


def stop_job(dashboard: str = DEFAULT_DASHBOARD, timeout_s: float = 300.0) -> str | None:
    """``ray job stop`` the job this checkout submitted (it drains first); return its id, or None if none."""
    if not JOB_ID_FILE.exists():
        return None
    job_id = JOB_ID_FILE.read_text().strip()
    run = job_cli(dashboard, "stop", job_id, timeout_s=timeout_s)
    if run.returncode != 0 and "does not exist" not in run.stdout + run.stderr:
        raise RuntimeError(f"ray job stop {job_id} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    JOB_ID_FILE.unlink(missing_ok=True)
    if JOB_CONFIG_FILE.exists():
        # A job that stopped cleanly killed its actors itself; one killed mid-drain (or by hand) left them,
        # and a teardown job (a whole driver start, ~20 s) removes them.
        if not stopped_cleanly(job_id, dashboard):
            teardown(JOB_CONFIG_FILE.read_text().strip(), dashboard, timeout_s)
        JOB_CONFIG_FILE.unlink(missing_ok=True)
    return job_id


def stopped_cleanly(job_id: str, dashboard: str = DEFAULT_DASHBOARD) -> bool:
    """Whether job ``job_id``'s log ends with the launcher's clean-stop line (no actor left behind;
    Ray's own shutdown may still print a line or two after it)."""
    try:
        run = job_cli(dashboard, "logs", job_id, timeout_s=60)
    except subprocess.TimeoutExpired:
        return False
    lines = (run.stdout or "").strip().splitlines()
    return run.returncode == 0 and STOPPED_LINE in (line.strip() for line in lines[-5:])


def teardown(config_path: str, dashboard: str = DEFAULT_DASHBOARD, timeout_s: float = 300.0) -> str:
    """Kill the actors a stopped deployment left in its namespace (``cluster.launch --teardown``,
    run as a job and waited for); return its output."""
    run = job_cli(dashboard, "submit", "--", sys.executable, "-m", "cluster.launch", "--config", config_path,
                  "--teardown", timeout_s=timeout_s)
    if run.returncode != 0:
        raise RuntimeError(f"teardown of {config_path} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return run.stdout


def router_address(cfg: ClusterConfig) -> str:
    return f"{cfg.router.host}:{cfg.router.port}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/local.yaml", help="deployment YAML")
    ap.add_argument("--address", default=DEFAULT_DASHBOARD, help="the Ray dashboard (job server) URL")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the router to be SERVING")
    ap.add_argument("--no-wait", action="store_true", help="return once submitted")
    ap.add_argument("--stop", action="store_true", help="stop the job this checkout submitted (drains first)")
    args = ap.parse_args(argv)
    try:
        if args.stop:
            job_id = stop_job(args.address)
            print(f"stopped job {job_id}" if job_id else "no job of this checkout to stop")
            return 0
        cfg = load_config(args.config)
        job_id = submit(args.config, args.address)
        print(f"submitted job {job_id}: python -m cluster.launch --config {args.config}", flush=True)
        if not args.no_wait:
            wait_serving(router_address(cfg), job_id, args.address, args.timeout)
            print(f"router SERVING on {router_address(cfg)}", flush=True)
    except (ConfigError, RayStartError, TimeoutError, RuntimeError) as e:
        print(f"splitserve: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
