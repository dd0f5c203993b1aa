"""How peers reach a worker's KV transport: one frozen dataclass per backend.

A worker publishes its transport's endpoint; the pool manager and the router
pass it on (Ray actor calls) to peers, which hand it back to ``send`` /
``expect``. Because it crosses process boundaries it is a typed value defined
here once, never a dict: :class:`Endpoint` holds what every backend has
(``worker_id``, ``backend``), each backend's subclass adds how to reach it,
and :class:`NodeLocalEndpoint` pairs a cross-node endpoint with the
shared-memory one. All are immutable, compare by value and pickle (Ray).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """What every endpoint has: whose transport it is and its backend's name."""

    worker_id: str
    backend: str


@dataclass(frozen=True, kw_only=True)
class InProcEndpoint(Endpoint):
    """An in-process transport: its hub finds it by ``worker_id``."""

    backend: str = "inproc"


@dataclass(frozen=True, kw_only=True)
class GrpcEndpoint(Endpoint):
    """A gRPC transport's server; ``max_chunk_bytes``: the largest chunk it takes in one message."""

    backend: str = "grpc"
    host: str
    port: int
    max_chunk_bytes: int


@dataclass(frozen=True, kw_only=True)
class TorchDistEndpoint(Endpoint):
    """A torch.distributed transport (``backend`` ``"gloo"`` or ``"nccl"``): its TCPStore.

    ``instance``: new with every transport, so a restarted worker is a new peer.
    ``sealed``: whether it seals its store records (has a secret); a sender
    with a secret then refuses unsealed ones.
    """

    host: str
    port: int
    instance: str
    sealed: bool


@dataclass(frozen=True, kw_only=True)
class RayEndpoint(Endpoint):
    """The named Ray actor that hosts a Ray transport (no name: nobody can deliver to it)."""

    backend: str = "ray"
    actor_name: str | None
    namespace: str | None


@dataclass(frozen=True, kw_only=True)
class ShmEndpoint(Endpoint):
    """A shared-memory transport: reachable only from the same ``node`` and ``host_key``.

    ``socket``: its abstract Unix socket's name (without the leading NUL);
    ``instance`` and ``pid`` name the process whose buffers a sender maps.
    """

    backend: str = "shm"
    node: str | None
    host_key: str
    socket: str
    instance: str
    pid: int


@dataclass(frozen=True, kw_only=True)
class NodeLocalEndpoint(Endpoint):
    """A :class:`~kvtransfer.node_local.NodeLocalTransport`: the cross-node backend's
    endpoint (``remote``) and the shared-memory one (``shm``) of one worker.

    ``worker_id`` and ``backend`` are ``remote``'s (the backend is the one
    configured; shared memory is chosen per pair).
    """

    remote: Endpoint
    shm: ShmEndpoint
    worker_id: str = field(init=False)
    backend: str = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.remote, NodeLocalEndpoint):
            raise ValueError("a node-local endpoint's remote half cannot be node-local itself")
        if self.remote.worker_id != self.shm.worker_id:
            raise ValueError(f"both halves must be one worker's: {self.remote.worker_id!r} != {self.shm.worker_id!r}")
        object.__setattr__(self, "worker_id", self.remote.worker_id)  # frozen: set once, here
        object.__setattr__(self, "backend", self.remote.backend)

    @property
    def node(self) -> str | None:
        """The node the worker runs on (the shared-memory half's)."""
        return self.shm.node


E = TypeVar("E", bound=Endpoint)


def narrow(peer: Endpoint, kind: type[E]) -> E:
    """``peer`` as a ``kind`` endpoint: itself, or the cross-node half of a node-local one.

    Raises ``ValueError`` when it is neither (a peer of another backend).
    """
    if isinstance(peer, NodeLocalEndpoint) and not issubclass(kind, NodeLocalEndpoint):
        peer = peer.remote
    if not isinstance(peer, kind):
        raise ValueError(f"the endpoint of {peer.worker_id!r} is {type(peer).__name__} ({peer.backend}), "
                         f"not {kind.__name__}")
    return peer
