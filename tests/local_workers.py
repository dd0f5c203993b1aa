"""Real worker objects in the test process (no Ray): each kind built the way
the pool manager builds its actors, from a ModelConfig, its engine section
and HandoffSettings; KV moves through shared memory (``same_node: shm``, the
default: these workers share a process, so a node), gRPC on loopback being the
cross-node half that this pair does not use."""

from __future__ import annotations

from decode_worker.colocated import ColocatedWorker
from decode_worker.worker import DecodeWorker
from prefill_worker.worker import PrefillWorker
from worker_common.worker_config import DecodeEngineConfig, HandoffSettings, ModelConfig, PrefillEngineConfig

LOOPBACK = HandoffSettings(backend="grpc", lease_s=30.0, host="127.0.0.1", chunk_bytes=1 << 20,
                           namespace="local")


def make_workers(model: str, num_blocks: int) -> tuple[PrefillWorker, DecodeWorker, ColocatedWorker]:
    """One worker of each kind serving ``model`` with ``num_blocks`` KV blocks; call ``shutdown()`` on each."""
    mc = ModelConfig(name=model)
    prefill = PrefillWorker("p0", model=mc, engine=PrefillEngineConfig(num_blocks=num_blocks), handoff=LOOPBACK)
    decode_engine = DecodeEngineConfig(num_blocks=num_blocks)
    return (prefill, DecodeWorker("d0", model=mc, engine=decode_engine, handoff=LOOPBACK),
            ColocatedWorker("c0", model=mc, engine=decode_engine, handoff=LOOPBACK))
