"""The KV transfer contract shared by every backend.

A worker owns one :class:`KVTransport`. A decode worker (receiver) is told
to ``expect`` a transfer before the prefill worker (sender) ``send``s it;
both sides then ``poll`` a status that moves through a small state machine:

    BOOTSTRAPPING -> WAITING -> TRANSFERRING -> SUCCESS
          \\______________\\____________\\______-> FAILED

- BOOTSTRAPPING: the connection to the peer is being set up.
- WAITING: ready; no byte has moved yet.
- TRANSFERRING: bytes are moving (possibly in chunks).
- SUCCESS: every byte arrived (receiver) / was accepted by the peer (sender).
- FAILED: timeout, abort, peer refusal or error; ``error()`` says which.

The payload is one contiguous tensor (the KV of a prompt in token-major
order ``[layers, 2, tokens, kv_heads, head_dim]``); the receiver knows its
shape and dtype from ``expect``, so no header travels with it. Token ids and
sampling state travel separately, through the router. Nothing received is
ever unpickled. Every wait is bounded by the ``timeout_s`` of its transfer.

An :class:`~kvtransfer.endpoints.Endpoint` (a frozen dataclass, one
subclass per backend, in :mod:`kvtransfer.endpoints`) is what a worker
publishes and peers pass back to ``send`` / ``expect``; its fields beyond
``worker_id`` and ``backend`` are the backend's business.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod

import torch

from kvtransfer.endpoints import Endpoint

__all__ = ["Endpoint", "KVTransport", "TransferError", "TransferStatus"]


class TransferStatus(enum.IntEnum):
    BOOTSTRAPPING = 0
    WAITING = 1
    TRANSFERRING = 2
    SUCCESS = 3
    FAILED = 4

    @property
    def done(self) -> bool:
        return self >= TransferStatus.SUCCESS


class TransferError(RuntimeError):
    """A transfer failed; raised by ``result`` when the status is FAILED."""


class KVTransport(ABC):
    """One worker's end of the KV transfer plane (both sender and receiver)."""

    @abstractmethod
    def endpoint(self) -> Endpoint:
        """How peers reach this transport (its backend's :class:`Endpoint` subclass)."""

    # ---------------------------------------------------------- receiver side
    @abstractmethod
    def expect(self, transfer_id: str, shape: tuple[int, ...], dtype: torch.dtype, peer: Endpoint,
               timeout_s: float) -> None:
        """Prepare to receive ``transfer_id`` from ``peer``; non-blocking."""

    @abstractmethod
    def result(self, transfer_id: str) -> torch.Tensor:
        """The received tensor once ``poll`` says SUCCESS; forgets the transfer.

        Raises :class:`TransferError` if it FAILED, ``KeyError`` if unknown.
        """

    # ------------------------------------------------------------ sender side
    @abstractmethod
    def send(self, transfer_id: str, tensor: torch.Tensor, peer: Endpoint, timeout_s: float) -> None:
        """Start pushing ``tensor`` to ``peer``; non-blocking."""

    # ---------------------------------------------------------------- both
    @abstractmethod
    def poll(self, transfer_id: str) -> TransferStatus:
        """Current status of a transfer this side sends or expects."""

    @abstractmethod
    def error(self, transfer_id: str) -> str | None:
        """Why a FAILED transfer failed."""

    @abstractmethod
    def abort(self, transfer_id: str) -> None:
        """Give up on a transfer (either side); its status becomes FAILED."""

    @abstractmethod
    def forget(self, transfer_id: str) -> None:
        """Drop all state of a finished transfer (idempotent)."""

    def close(self) -> None:
        """Release sockets, servers and process groups."""
