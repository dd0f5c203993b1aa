"""The typed endpoints: immutable values that survive pickling (Ray), the node-local
pair's derived fields, and ``narrow`` (which a plain transport uses to reach a
node-local peer through its cross-node half)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from ray import cloudpickle

from kvtransfer import make_transport
from kvtransfer.endpoints import (Endpoint, GrpcEndpoint, InProcEndpoint, NodeLocalEndpoint, RayEndpoint,
                                  ShmEndpoint, TorchDistEndpoint, narrow)
from kvtransfer.grpc_transport import GrpcTransport
from kvtransfer.node_local import NodeLocalTransport

from .helpers import assert_same_bytes, kv, transfer

pytestmark = pytest.mark.timeout(60)

GRPC = GrpcEndpoint(worker_id="w", host="10.0.0.1", port=4000, max_chunk_bytes=1 << 20)
SHM = ShmEndpoint(worker_id="w", node="node-1", host_key="boot/net:[1]", socket="splitserve-kv/x", instance="i",
                  pid=42)
EVERY_KIND = [
    InProcEndpoint(worker_id="w"),
    GRPC,
    TorchDistEndpoint(worker_id="w", backend="gloo", host="10.0.0.1", port=4001, instance="i", sealed=True),
    RayEndpoint(worker_id="w", actor_name="prefill-0", namespace="ns"),
    SHM,
    NodeLocalEndpoint(remote=GRPC, shm=SHM),
]


@pytest.mark.parametrize("ep", EVERY_KIND, ids=lambda ep: type(ep).__name__)
def test_endpoints_are_frozen_values_that_pickle(ep: Endpoint) -> None:
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(ep))
        assert back == ep and type(back) is type(ep) and hash(back) == hash(ep)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ep.worker_id = "other"  # type: ignore[misc]


def test_node_local_endpoint_takes_its_name_and_backend_from_its_halves() -> None:
    ep = NodeLocalEndpoint(remote=GRPC, shm=SHM)
    assert (ep.worker_id, ep.backend, ep.node) == ("w", "grpc", "node-1")
    moved = dataclasses.replace(ep, remote=dataclasses.replace(GRPC, port=5000))
    assert moved.remote.port == 5000 and moved != ep and moved.backend == "grpc"
    with pytest.raises(ValueError, match="one worker"):
        NodeLocalEndpoint(remote=GRPC, shm=dataclasses.replace(SHM, worker_id="v"))
    with pytest.raises(ValueError, match="cannot be node-local"):
        NodeLocalEndpoint(remote=ep, shm=SHM)


def test_narrow_unwraps_the_node_local_pair_and_refuses_other_backends() -> None:
    pair = NodeLocalEndpoint(remote=GRPC, shm=SHM)
    assert narrow(GRPC, GrpcEndpoint) is GRPC
    assert narrow(pair, GrpcEndpoint) is GRPC
    assert narrow(pair, NodeLocalEndpoint) is pair
    with pytest.raises(ValueError, match="not RayEndpoint"):
        narrow(pair, RayEndpoint)
    with pytest.raises(ValueError, match="not TorchDistEndpoint"):
        narrow(SHM, TorchDistEndpoint)


def test_a_plain_transport_sends_to_a_node_local_peer_through_its_backend() -> None:
    plain = make_transport("grpc", "plain", same_node="backend")
    pair = make_transport("grpc", "pair", same_node="shm", node_id="node-1")
    try:
        assert isinstance(plain, GrpcTransport) and isinstance(pair, NodeLocalTransport)
        assert isinstance(pair.endpoint(), NodeLocalEndpoint) and pair.path_for(plain.endpoint()) == "grpc"
        x = kv((4, 64), seed=3)
        assert_same_bytes(transfer(plain, pair, "plain-to-pair", x), x)
        assert pair.remote.stats()["bytes_received"] == x.nbytes  # type: ignore[attr-defined]
        assert pair.local.stats()["bytes_received"] == 0
    finally:
        plain.close()
        pair.close()
