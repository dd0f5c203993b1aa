"""The settings a worker is built from, one type per config section it reads.

``cluster.config`` builds its YAML sections on these (a pool section is the
engine section plus the actor's resources), and the deployment hands each
worker the engine part of its section as is: a setting has one name from the
YAML file to the engine, and nothing is renamed or borrowed on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.format_names import ComputeDtype, Quantization
from kvtransfer.faults import TransferFaults
from kvtransfer.shm_settings import DEFAULT_SAME_NODE, DEFAULT_SHM_POOL_BYTES
from kvtransfer.stream_limits import DEFAULT_MAX_STREAMS_PER_PEER, DEFAULT_STREAM_IDLE_S


class Settings(BaseModel):
    """A config section: unknown fields refused, frozen, numbers validated strictly.

    ``.inf`` and ``.nan`` are refused in every number: an infinite timeout or
    lease is accepted by YAML but overflows (or never fires) at run time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @classmethod
    def part_of(cls, section: BaseModel) -> Self:
        """This type's fields of ``section`` (a section that extends this type), as this type."""
        return cls.model_validate(section.model_dump(include=set(cls.model_fields)))


class ModelConfig(Settings):
    """Which model every worker loads."""

    name: str = "builtin:smollm2-135m-instruct"  # builtin:<name>, a local HF dir or a .gguf file
    # Activations, norms, embedding and KV cache. float32 is the exactness reference (token-identical
    # to transformers' generate()); a pool may override it (pools.<kind>.dtype).
    dtype: ComputeDtype = "float32"
    # Weight-only quantization of the linear layers: int8 per output channel, int4 per group of 32
    # input channels (PyTorch's packed CPU kernels). A pool may override it (pools.<kind>.quantization).
    quantization: Quantization = "none"
    max_model_len: int | None = Field(None, ge=2)  # None: the model's own context length

    def for_pool(self, dtype: str | None, quantization: str | None) -> ModelConfig:
        """This config with a pool's format overrides applied (None: keep the model's)."""
        return self.model_copy(update={"dtype": dtype or self.dtype, "quantization": quantization or self.quantization})


class PrefillEngineConfig(Settings):
    """A prefill worker's engine and batching knobs."""

    # torch compute threads; None: the actor's num_cpus rounded up, at most the machine's cores
    # (Ray alone would give a fractional-CPU actor one thread). See worker_common.threads.
    threads: int | None = Field(None, ge=1)
    block_size: int = Field(16, ge=1)
    num_blocks: int = Field(1024, ge=1)  # KV kept only until decode acknowledges, so smaller than decode's
    max_running: int = Field(64, ge=1)
    max_batched_tokens: int = Field(2048, ge=1)  # prompt tokens packed into one prefill forward
    # How long to wait to gather a batch before running it; past a second it only adds latency.
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)
    # Keep computed full KV blocks after their request and reuse them for a
    # prompt with the same prefix (the prefill skips the cached part).
    prefix_caching: bool = True

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments of :class:`engine.llm_engine.LLMEngine`."""
        return self.model_dump(exclude={"batch_wait_ms", "threads"})


class DecodeEngineConfig(Settings):
    """A decode (or colocated) worker's paged KV budget and batching knobs."""

    threads: int | None = Field(None, ge=1)  # as PrefillEngineConfig.threads
    block_size: int = Field(16, ge=1)
    num_blocks: int | None = Field(2048, ge=1)  # exactly one of num_blocks / kv_cache_bytes
    kv_cache_bytes: int | None = Field(None, ge=1)  # the worker turns bytes into blocks for its model
    max_running: int = Field(64, ge=1)
    max_batched_tokens: int = Field(2048, ge=1)
    # Keep computed and imported full KV blocks after their request: the next
    # turn of a conversation finds them, and only the rest is sent or computed.
    prefix_caching: bool = True
    # Run decode-only steps through a decoder layer compiled by torch.compile (inductor, CPU only;
    # engine.compiled_decode): a few fused kernels per layer instead of ~20 operators. The first
    # step of each batch class compiles (seconds to a minute on a small CPU; cached on disk after).
    compile: bool = False
    # Send each request's tokens at most this often (ms): the tokens of the steps in between leave as one
    # chunk (worker_common.chunk_coalescer). 0: a chunk per step. The first and last chunk never wait.
    stream_interval_ms: float = Field(0.0, ge=0, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _bytes_replace_blocks(cls, data: Any) -> Any:
        # num_blocks has a default, so a user who sets only kv_cache_bytes means
        # "size by bytes": drop the default instead of reporting a conflict.
        if isinstance(data, Mapping) and data.get("kv_cache_bytes") is not None and "num_blocks" not in data:
            data = {**data, "num_blocks": None}
        return data

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments of :class:`engine.llm_engine.LLMEngine`."""
        return self.model_dump(exclude={"threads", "stream_interval_ms"})


AUTO_HOST = "auto"  # kvtransfer.host: each node's own address, as Ray registered the node


def resolve_host(host: str) -> str:
    """``host`` as given, or for ``"auto"`` the address of the node this process runs on.

    Call it in the worker, not where the config is read: one config serves
    every node of a cluster, and each pod or machine must advertise its own
    address to its peers (the one Ray itself uses to reach the node).
    """
    if host != AUTO_HOST:
        return host
    import ray

    return ray.util.get_node_ip_address()


def resolve_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): peers with the same one share memory."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@dataclass(frozen=True)
class HandoffSettings:
    """How a worker moves KV (the ``kvtransfer`` section, plus what the
    deployment adds: the loaded secret, the Ray namespace, test faults)."""

    backend: str
    lease_s: float  # how long either side holds blocks for the other (see cluster.config.KVTransferConfig)
    host: str  # an address, or "auto": this node's (see resolve_host)
    chunk_bytes: int
    namespace: str  # where the ray backend finds its peers' actors
    stream_idle_s: float = DEFAULT_STREAM_IDLE_S  # grpc: a push stream silent this long is closed
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER  # grpc: open push streams per sender
    same_node: str = DEFAULT_SAME_NODE  # "shm": pairs on one node move KV through shared memory
    shm_pool_bytes: int = DEFAULT_SHM_POOL_BYTES  # shm: the receiver's pool of reusable buffers
    secret: str | None = None
    faults: TransferFaults | None = None  # fault injection (tests)

    def transport_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the backend's transport (:func:`kvtransfer.make_transport`);
        called in the worker, so ``host: auto`` becomes that worker's node address."""
        # Ray's backend finds its peers by actor name; the others by address.
        kwargs: dict[str, Any] = ({"namespace": self.namespace} if self.backend == "ray"
                                  else {"host": resolve_host(self.host), "chunk_bytes": self.chunk_bytes})
        if self.backend == "grpc":
            kwargs.update(stream_idle_s=self.stream_idle_s, max_streams_per_peer=self.max_streams_per_peer)
        if self.same_node == "shm":
            kwargs.update(same_node="shm", node_id=resolve_node_id(), shm_pool_bytes=self.shm_pool_bytes)
        if self.secret is not None:
            kwargs["secret"] = self.secret
        if self.faults is not None:
            kwargs["faults"] = self.faults
        return kwargs
