"""Run by test_two_node.py in a fresh process: a two-node local cluster
(``ray.cluster_utils.Cluster``), prefill pool on one node, decode pool on
the other; prints one JSON line with what it saw.

``two_node_main <backend> auto``: the second node gets its own address
(127.0.0.2, another loopback address of this machine) and the config says
``kvtransfer.host: auto``, so each worker must advertise its own node's IP.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RAY_AUTH_MODE"] = "token"
os.environ.pop("RAY_ADDRESS", None)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from kvtransfer.endpoints import Endpoint, GrpcEndpoint, NodeLocalEndpoint, TorchDistEndpoint  # noqa: E402
from router.client import Client  # noqa: E402


def advertised_host(endpoint: Endpoint) -> str:
    """The host a worker's endpoint gives peers on other nodes (its cross-node half's)."""
    remote = endpoint.remote if isinstance(endpoint, NodeLocalEndpoint) else endpoint
    assert isinstance(remote, (GrpcEndpoint, TorchDistEndpoint)), remote
    return remote.host


def main() -> int:
    from cluster.deployment import BackgroundDeployment
    from benchmarks.deployments import make_config

    auto = len(sys.argv) > 2 and sys.argv[2] == "auto"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"prefill_node": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"decode_node": 1}, node_ip_address="127.0.0.2" if auto else "127.0.0.1")
    ray.init(address=cluster.address, logging_level="WARNING")
    kvtransfer = None
    if auto:
        os.environ["SPLITSERVE_TEST_KV_SECRET"] = "two-node-test-secret"
        kvtransfer = {"host": "auto", "secret_env": "SPLITSERVE_TEST_KV_SECRET"}
    cfg = make_config(backend=sys.argv[1] if len(sys.argv) > 1 else "gloo", kvtransfer=kvtransfer,
                      prefill={"resources": {"prefill_node": 0.1}}, decode={"resources": {"decode_node": 0.1}})
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    d = BackgroundDeployment(cfg)
    try:
        address = d.start()
        client = Client(address)
        out = client.generate("two nodes, one answer", max_tokens=10, ignore_eos=True)
        status = client.status()
        placement = {p.kind: [w.node_id for w in p.workers] for p in status.pools}
        table = ray.get(d.deployment.pool_manager.table.remote(), timeout=60)
        # What each worker advertises to its peers, beside the address of the node it runs on.
        endpoints = [{"kind": w.kind, "advertised": advertised_host(w.endpoint), "node_ip": node_ips[w.node_id]}
                     for w in table.workers]
        print(json.dumps({
            "tokens": out.token_ids,
            "prefill_nodes": [sorted(nodes[n]) for n in placement["prefill"]],
            "decode_nodes": [sorted(nodes[n]) for n in placement["decode"]],
            "distinct": set(placement["prefill"]).isdisjoint(placement["decode"]),
            "endpoints": endpoints,
        }), flush=True)
    finally:
        d.stop()
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
