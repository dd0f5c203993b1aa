"""Ray backend specifics: a driver-side sender, the actor mixin's refusals."""

from __future__ import annotations

import pytest
import ray
import torch

from kvtransfer.base import TransferError, TransferStatus
from kvtransfer.endpoints import Endpoint, RayEndpoint
from kvtransfer.ray_transport import KVTransferActorMixin, RayTransport

from .helpers import assert_same_bytes, kv, wait_done
from .ray_hosts import CALL_TIMEOUT_S, ActorTransport

pytestmark = pytest.mark.timeout(120)


def test_driver_sends_to_an_actor(ray_hosts) -> None:
    host = ray_hosts[0]
    rx = ActorTransport(host, ray.get(host.open.remote("ray", "rx", {}), timeout=CALL_TIMEOUT_S))
    tx = RayTransport("driver")  # not an actor: it can send, but cannot receive
    try:
        assert rx.endpoint().actor_name == "kvt-host-0" and rx.endpoint().namespace
        with pytest.raises(RuntimeError):
            tx.expect("nope", (1,), torch.float32, rx.endpoint(), 1.0)
        x = kv((30, 2, 64, 3, 64), seed=4)
        rx.expect("d", tuple(x.shape), x.dtype, tx.endpoint(), 30.0)
        tx.send("d", x, rx.endpoint(), 30.0)
        assert wait_done(tx, "d") == TransferStatus.SUCCESS, tx.error("d")
        assert wait_done(rx, "d") == TransferStatus.SUCCESS, rx.error("d")
        assert_same_bytes(rx.result("d"), x)
        tx.send("missing-actor", x, RayEndpoint(worker_id="z", actor_name="no-such-actor", namespace="x"), 5.0)
        assert wait_done(tx, "missing-actor") == TransferStatus.FAILED
    finally:
        tx.close()
        rx.close()


def test_mixin_refuses_without_a_ray_transport() -> None:
    class NotRay(KVTransferActorMixin):
        kv_transport = object()

    with pytest.raises(TransferError):
        NotRay().kvtransfer_deliver("t", [])


def test_deliver_refusals_without_ray_calls() -> None:
    tr = RayTransport("r", actor_name="fake", namespace="ns")
    try:
        with pytest.raises(TransferError, match="not expected"):
            tr.deliver("unknown", [])
        tr.expect("t", (2,), torch.float32, Endpoint(worker_id="s", backend="ray"), 10.0)
        with pytest.raises(TransferError, match="expected from"):
            tr.deliver("t", [None], sender_id="intruder")  # type: ignore[list-item]
        assert tr.poll("t") == TransferStatus.WAITING
        with pytest.raises(TransferError, match="size mismatch"):
            tr.deliver("t", [None], sender_id="s", nbytes=4)  # type: ignore[list-item]
        assert tr.poll("t") == TransferStatus.FAILED
    finally:
        tr.close()
