"""KV cache transfer between prefill and decode workers.

One contract (:class:`KVTransport`, in :mod:`kvtransfer.base`) and its
backends: ``torch_dist`` (gloo / NCCL), ``grpc_transport``,
``ray_transport``, ``shm_transport`` (shared memory, one node; chosen per
pair by ``node_local``) and the in-process fake ``inproc``; build one with
:func:`make_transport`. Faults are injected with :class:`TransferFaults`.
"""

from kvtransfer.base import Endpoint, KVTransport, TransferError, TransferStatus
from kvtransfer.factory import BACKENDS, make_transport
from kvtransfer.faults import TransferFaults

__all__ = ["BACKENDS", "Endpoint", "KVTransport", "TransferError", "TransferFaults", "TransferStatus",
           "make_transport"]
