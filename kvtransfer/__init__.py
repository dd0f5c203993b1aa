"""KV cache transfer between prefill and decode workers.

One contract (:class:`KVTransport`, in :mod:`kvtransfer.base`) and its
backends: ``torch_dist`` (gloo / NCCL), ``grpc_transport``,
``ray_transport``, ``shm_transport`` (shared memory, one node; chosen per
pair by ``node_local``) and the in-process fake ``inproc``; build one with
:func:`make_transport`. How peers reach a transport is a typed
:class:`Endpoint` (one frozen dataclass per backend, :mod:`kvtransfer.endpoints`).
Faults are injected with :class:`TransferFaults`.
May import ``protos``, ``analysis`` and ``engine``; never ``worker_common``, the workers or above.
"""

from kvtransfer.base import KVTransport, TransferError, TransferStatus
from kvtransfer.endpoints import (Endpoint, GrpcEndpoint, InProcEndpoint, NodeLocalEndpoint, RayEndpoint,
                                  ShmEndpoint, TorchDistEndpoint, narrow)
from kvtransfer.factory import BACKENDS, make_transport
from kvtransfer.faults import TransferFaults

__all__ = ["BACKENDS", "Endpoint", "GrpcEndpoint", "InProcEndpoint", "KVTransport", "NodeLocalEndpoint",
           "RayEndpoint", "ShmEndpoint", "TorchDistEndpoint", "TransferError", "TransferFaults", "TransferStatus",
           "make_transport", "narrow"]
