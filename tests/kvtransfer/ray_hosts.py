"""Ray actors that host one transport each, and a KVTransport proxy to drive them.

The Ray backend needs its receiver inside a named actor; hosting gloo
transports the same way puts sender and receiver in separate processes, as
in a real deployment. Test code drives a hosted transport through
:class:`ActorTransport`, which forwards each call with a bounded ``ray.get``.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from kvtransfer.base import Endpoint, KVTransport, TransferStatus
from kvtransfer.factory import make_transport
from kvtransfer.ray_transport import KVTransferActorMixin

CALL_TIMEOUT_S = 60.0
# The namespace the hosts are created in. A RayTransport inside an actor would
# otherwise advertise the driver's namespace, which differs when the session's
# Ray connection was made by another fixture.
RAY_NAMESPACE = "kvtransfer-tests"


@ray.remote(num_cpus=0, max_concurrency=8)
class TransportHost(KVTransferActorMixin):
    """Holds at most one transport at a time; ``open`` replaces it."""

    def __init__(self) -> None:
        self.kv_transport: KVTransport | None = None

    def open(self, backend: str, worker_id: str, kwargs: dict[str, Any]) -> Endpoint:
        self.close()
        if backend == "ray":
            kwargs = {"namespace": RAY_NAMESPACE, **kwargs}
        self.kv_transport = make_transport(backend, worker_id, **kwargs)
        return self.kv_transport.endpoint()

    def call(self, method: str, *args: Any) -> Any:
        assert self.kv_transport is not None, "open() first"
        return getattr(self.kv_transport, method)(*args)

    def close(self) -> None:
        if self.kv_transport is not None:
            self.kv_transport.close()
            self.kv_transport = None

    def shm_leftovers(self) -> list[str]:
        """Shared-memory buffers still mapped or open in this actor's process."""
        from tests.kvtransfer.helpers import shm_leftovers

        return shm_leftovers()

    def pid(self) -> int:
        import os

        return os.getpid()


class ActorTransport(KVTransport):
    """A :class:`KVTransport` whose calls run on a :class:`TransportHost` actor."""

    def __init__(self, host: Any, endpoint: Endpoint) -> None:
        self._host = host
        self._endpoint = endpoint

    def _call(self, method: str, *args: Any) -> Any:
        return ray.get(self._host.call.remote(method, *args), timeout=CALL_TIMEOUT_S)

    def endpoint(self) -> Endpoint:
        return self._endpoint

    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        self._call("expect", transfer_id, tuple(shape), dtype, peer, timeout_s)

    def result(self, transfer_id: str) -> torch.Tensor:
        return self._call("result", transfer_id)

    def send(self, transfer_id: str, tensor: torch.Tensor, peer: Endpoint, timeout_s: float) -> None:
        self._call("send", transfer_id, tensor, peer, timeout_s)

    def poll(self, transfer_id: str) -> TransferStatus:
        return TransferStatus(self._call("poll", transfer_id))

    def error(self, transfer_id: str) -> str | None:
        return self._call("error", transfer_id)

    def abort(self, transfer_id: str) -> None:
        self._call("abort", transfer_id)

    def forget(self, transfer_id: str) -> None:
        self._call("forget", transfer_id)

    def stats(self) -> dict[str, int]:
        return self._call("stats")

    def close(self) -> None:
        ray.get(self._host.close.remote(), timeout=CALL_TIMEOUT_S)
