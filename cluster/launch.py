"""Entry point of a deployment: ``python -m cluster.launch --config deploy/local.yaml``.

Submitted with ``ray job submit`` it joins that Ray cluster; run bare, it
joins a running local cluster or starts one. It creates the pools, starts
the router, and serves until SIGTERM/SIGINT (``ray job stop``), then stops
admitting, lets in-flight requests finish and stops the actors.

The pool manager, the workers and (with ``router.replicas`` > 1) the router
replicas are detached actors of the deployment's Ray namespace: a launch that
dies without stopping (SIGKILL) leaves them serving (the replicas keep the
port open), and the next launch adopts them. ``--teardown`` kills every named
actor of the namespace instead (``python -m cluster.submit --stop`` runs it
after the job has stopped, so nothing outlives a stopped deployment).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from cluster.config import ClusterConfig, ConfigError, RayConfig, load_config

# The job's last line after a clean stop (every actor of its namespace killed): `cluster.submit --stop`
# reads it in the job's log to know that no teardown is needed.
STOPPED_LINE = "splitserve: stopped"
from cluster.local_ray import apply_ray_env

log = logging.getLogger("splitserve.launch")


def job_runtime_env(cfg: ClusterConfig) -> dict:
    """The ``--runtime-env-json`` to submit this deployment with.

    ``ray job stop`` sends SIGTERM, then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S``
    (3 s by default: too short to drain). This gives the drain its grace
    period plus a minute to stop the actors.
    """
    return {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(int(cfg.router.drain_grace_s) + 60)}}


def connect_ray(rc: RayConfig) -> None:
    """Join the configured / ambient Ray cluster, or start a local one on 127.0.0.1."""
    apply_ray_env()  # token auth and loopback, before ray is imported
    import ray

    if rc.address:
        ray.init(address=rc.address, namespace=rc.namespace)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=rc.namespace)  # inside `ray job submit`
    else:
        try:
            ray.init(address="auto", namespace=rc.namespace)
        except ConnectionError:
            # A local cluster of our own; apply_ray_env's single-node mode keeps it on 127.0.0.1.
            ray.init(num_cpus=rc.num_cpus, namespace=rc.namespace, include_dashboard=False,
                     _node_ip_address="127.0.0.1")


async def serve(cfg: ClusterConfig) -> None:
    from cluster.deployment import Deployment

    deployment = Deployment(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        address = await deployment.start()
        p, d = cfg.pools.counts()
        pools = (f"{d} colocated" if cfg.pools.colocated
                 else f"{p} prefill + {d} decode, kvtransfer={cfg.kvtransfer.backend}")
        n = cfg.router.replicas
        metrics = "" if deployment.metrics_port is None else (
            f"; metrics on http://{cfg.router.metrics_host}:{deployment.metrics_port}/metrics"
            + (f" (router replica i: port {deployment.metrics_port} + i)" if n > 1 else ""))
        routers = "1 router in this process" if n == 1 else f"{n} router replicas"
        http = f"; OpenAI API on {deployment.http_url}" if deployment.http_url else ""
        print(f"splitserve: serving {cfg.model.name} on {address} ({pools}; {routers}){http}{metrics}", flush=True)
        await stop.wait()
        print(f"splitserve: stopping (draining in-flight requests for up to {cfg.router.drain_grace_s:.0f} s)",
              flush=True)
    finally:
        await deployment.stop()
    print(STOPPED_LINE, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="deployment YAML (default: built-in defaults)")
    ap.add_argument("--teardown", action="store_true",
                    help="kill every actor the deployment left in its namespace (after its job stopped)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config) if args.config else ClusterConfig()
    except ConfigError as e:
        print(f"splitserve: {e}", file=sys.stderr)
        return 2
    connect_ray(cfg.ray)
    if args.teardown:
        from cluster.pool_manager import kill_named_actors, named_actors

        killed = kill_named_actors(cfg.ray.namespace)
        print(f"splitserve: killed {len(killed)} leftover actors of namespace {cfg.ray.namespace!r}: "
              f"{', '.join(sorted(killed)) or 'none'}", flush=True)
        survivors = named_actors(cfg.ray.namespace)
        if survivors:
            print(f"splitserve: still alive after the teardown: {', '.join(sorted(survivors))}", file=sys.stderr)
            return 1
        return 0
    try:
        asyncio.run(serve(cfg))
    except ConfigError as e:  # cluster.preflight: KV that cannot fit, before any actor started
        print(f"splitserve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
