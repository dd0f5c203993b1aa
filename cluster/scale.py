"""Resize a running deployment while keeping its prefill:decode ratio.

    python -m cluster.scale --total 4 [--namespace splitserve] [--address 127.0.0.1:6379]

Connects to the Ray cluster, finds the deployment's pool manager by name,
and asks it to scale; prints the new counts.
"""

from __future__ import annotations

import argparse
import sys

from cluster.local_ray import apply_ray_env

CALL_TIMEOUT_S = 900.0  # new actors load the model before they count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=int, required=True, help="actors over both pools; a multiple of P+D")
    ap.add_argument("--namespace", default="splitserve")
    ap.add_argument("--address", default="auto", help="the Ray cluster (GCS) address; auto: the local one")
    args = ap.parse_args(argv)
    apply_ray_env()  # token auth and loopback, before ray is imported
    import ray

    from cluster.pool_manager import POOL_MANAGER_NAME

    ray.init(address=args.address, namespace=args.namespace, logging_level="WARNING")
    try:
        pm = ray.get_actor(POOL_MANAGER_NAME, namespace=args.namespace)
    except ValueError:
        print(f"no splitserve deployment in namespace {args.namespace!r}", file=sys.stderr)
        return 1
    try:
        counts = ray.get(pm.scale.remote(args.total), timeout=CALL_TIMEOUT_S)
    except ray.exceptions.RayTaskError as e:
        print(f"scale refused: {e.cause if hasattr(e, 'cause') else e}", file=sys.stderr)
        return 2
    print(f"prefill={counts['prefill']} decode={counts['decode']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
