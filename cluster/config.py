"""The deployment config tree: one YAML file, validated with pydantic.

    cfg = load_config("deploy/local.yaml")   # or YAML text, or parse_config(dict)
    prefill_n, decode_n = cfg.pools.counts()

Every model forbids unknown fields and is frozen, so a typo or a bad value is
refused at start with its dotted path and the reason, never ignored or patched
later. Every section has defaults: an empty file is a valid CPU config.
Numbers are validated strictly (``"2"`` is not an int, ``true`` is not 1).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cluster.config_yaml import FieldProblems, describe_error, read_yaml
from engine.format_names import UNCOMPILABLE_QUANTIZATIONS, ComputeDtype, Quantization
from kvtransfer.shm_settings import DEFAULT_SAME_NODE, DEFAULT_SHM_POOL_BYTES, MAX_SHM_POOL_BYTES, SAME_NODE_MODES
from kvtransfer.stream_limits import (DEFAULT_MAX_STREAMS_PER_PEER, DEFAULT_STREAM_IDLE_S, MAX_STREAM_IDLE_S,
                                      MAX_STREAMS_PER_PEER)
from worker_common.worker_config import DecodeEngineConfig, ModelConfig, PrefillEngineConfig, Settings

MiB = 1024 * 1024
GiB = 1024 * MiB
# The longest timeout, lease or grace period accepted: a day. Longer is a typo
# (or .inf) that would overflow a timer or hold resources for good.
MAX_WAIT_S = 86400.0
# The smallest KV chunk: below this a transfer is mostly per-message overhead
# (chunk_bytes: 1 sends a 1 MB prompt's KV as a million messages).
MIN_CHUNK_BYTES = 64 * 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: assume others can reach it


def is_unspecified(host: str) -> bool:
    """Whether ``host`` means "every interface" (0.0.0.0, ::): a bind address, not one to advertise."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def default_router_replicas() -> int:
    """``router.replicas`` when unset: 2 where N processes can serve one port (Linux:
    gRPC binds with SO_REUSEPORT), else 1."""
    return 2 if sys.platform.startswith("linux") else 1


class ConfigError(ValueError):
    """A config that cannot be used. ``problems`` holds one ``"<dotted.path>: <reason>"`` per entry."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid config {source} ({len(problems)} {noun}):\n" + "\n".join(f"  {p}" for p in problems))


# Extra Ray resources an actor asks for (e.g. {"accelerator_type:H100": 0.001}).
# CPU and GPU are refused here: Ray wants them as num_cpus / num_gpus.
Resources = dict[str, Annotated[float, Field(ge=0)]]


def _no_cpu_gpu(resources: dict[str, float]) -> dict[str, float]:
    bad = sorted(set(resources) & {"CPU", "GPU"})
    if bad:
        raise ValueError(f"set CPU and GPU with num_cpus / num_gpus, not here (got {', '.join(bad)})")
    return resources


class _ActorResources(Settings):
    """Ray resources of one pool's actors, and the pool's explicit size."""

    replicas: int | None = Field(None, ge=1)  # explicit count; else derived from pools.ratio
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    resources: Resources = Field(default_factory=dict)

    _check_resources = field_validator("resources")(_no_cpu_gpu)


class _PoolFormat(Settings):
    """A pool's weight format, overriding ``model.dtype`` / ``model.quantization`` (None: the model's).
    Prefill is compute-bound and decode bandwidth-bound, so they may differ; the KV dtype (= dtype)
    must match on both sides of a hand-off (checked in :class:`ClusterConfig`)."""

    dtype: ComputeDtype | None = None
    quantization: Quantization | None = None


class PrefillPoolConfig(PrefillEngineConfig, _ActorResources, _PoolFormat):
    """One prefill actor's resources and engine knobs (the worker gets the :class:`PrefillEngineConfig` part)."""


class DecodePoolConfig(DecodeEngineConfig, _ActorResources, _PoolFormat):
    """One decode actor's resources and engine knobs (the worker gets the :class:`DecodeEngineConfig` part)."""

    @model_validator(mode="after")
    def _one_kv_budget(self) -> DecodePoolConfig:
        if self.num_blocks is not None and self.kv_cache_bytes is not None:
            raise FieldProblems([("kv_cache_bytes", "set either num_blocks or kv_cache_bytes, not both")])
        if self.num_blocks is None and self.kv_cache_bytes is None:
            raise FieldProblems([("num_blocks", "set num_blocks or kv_cache_bytes")])
        return self


_RATIO = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_ratio(text: str) -> tuple[int, int]:
    """``"2:1"`` -> ``(2, 1)``; raises ValueError unless both sides are positive integers."""
    m = _RATIO.fullmatch(text)
    if m is None:
        raise ValueError(f'must look like "P:D" (prefill:decode), e.g. "2:1"; got {text!r}')
    p, d = int(m.group(1)), int(m.group(2))
    if p < 1 or d < 1:
        raise ValueError(f"both sides must be positive integers; got {text!r}")
    return p, d


AUTO_RATIO = "auto"


class AutoscaleConfig(Settings):
    """``pools.autoscale``: resize the pools from per-role load signals (see :mod:`cluster.autoscale_policy`).

    Every ``interval_s`` the pool manager reads each worker's status. A role
    is under pressure (prefill: queued prompt tokens per worker above
    ``prefill_queue_tokens``, or the share of recent requests within ``ttft_s``
    below ``attainment``; decode: KV-cache use or running sequences over
    ``max_running`` above ``high_load``, or the TPOT share below
    ``attainment``) or idle (everything below ``low_load``). Pressure held for
    ``scale_up_window_s`` adds a worker, idleness held for
    ``scale_down_window_s`` drains one; after any change nothing changes for
    ``cooldown_s``. The total stays within ``[min_total, max_total]``.
    """

    min_total: int = Field(2, ge=2)  # workers over both pools, at least one of each
    max_total: int = Field(8, ge=2)
    # "P:D": every change keeps this split within rounding; "auto": the split follows
    # the measured worker-seconds of prefill and decode per request.
    ratio: str = AUTO_RATIO
    ttft_s: float = Field(2.0, gt=0, le=MAX_WAIT_S)  # target: the prefill workers' part of TTFT
    tpot_s: float = Field(0.2, gt=0, le=MAX_WAIT_S)  # target: time per output token on the decode workers
    attainment: float = Field(0.9, gt=0, le=1)  # share of recent requests that must meet the target
    prefill_queue_tokens: int = Field(4096, ge=1)  # queued prompt tokens per prefill worker that count as pressure
    high_load: float = Field(0.85, gt=0, le=1)  # decode KV use / running share above this: pressure
    low_load: float = Field(0.25, ge=0, lt=1)  # every load figure below this: idle (may shrink)
    interval_s: float = Field(5.0, gt=0, le=3600)
    scale_up_window_s: float = Field(10.0, ge=0, le=MAX_WAIT_S)  # pressure held this long before adding
    scale_down_window_s: float = Field(60.0, ge=0, le=MAX_WAIT_S)  # idleness held this long before draining
    cooldown_s: float = Field(30.0, ge=0, le=MAX_WAIT_S)  # no change for this long after one
    ratio_window_s: float = Field(120.0, gt=0, le=MAX_WAIT_S)  # ratio auto: the window of measured work
    # When the total is at max_total and the split must move, switch a drained
    # worker's role in place (keeping its weights) instead of restarting it.
    role_switch: bool = True
    advisory: bool = False  # decide, log and expose the decisions as metrics; change nothing

    @field_validator("ratio", mode="before")
    @classmethod
    def _check_ratio(cls, value: Any) -> Any:
        if value == AUTO_RATIO:
            return value
        if not isinstance(value, str):
            raise ValueError(f'must be "auto" or a quoted string "P:D", e.g. "2:1"; got {value!r}')
        p, d = parse_ratio(value)
        return f"{p}:{d}"

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscaleConfig:
        problems: list[tuple[str, str]] = []
        if self.max_total < self.min_total:
            problems.append(("max_total", f"{self.max_total} is below min_total {self.min_total}"))
        if self.low_load >= self.high_load:
            problems.append(("low_load", f"{self.low_load} must be below high_load {self.high_load}"))
        if problems:
            raise FieldProblems(problems)
        return self

    def fixed_ratio(self) -> tuple[int, int] | None:
        """The fixed prefill:decode split, or ``None`` for ``auto``."""
        return None if self.ratio == AUTO_RATIO else parse_ratio(self.ratio)


def _replicas_of(pool: Any) -> Any:
    """``replicas`` of a pool section given as a mapping (YAML) or a model (Python)."""
    if isinstance(pool, Mapping):
        return pool.get("replicas")
    return getattr(pool, "replicas", None) if isinstance(pool, BaseModel) else None


class PoolsConfig(Settings):
    """Pool sizes, as ``ratio`` + total ``replicas`` or as explicit per-pool ``replicas``.

    Neither form given means ratio "1:1" with 2 replicas; ``ratio`` alone means
    one group (P+D replicas); ``replicas`` alone means ratio "1:1". When both
    forms are given they must agree.
    """

    # disaggregated: prefill and decode pools at the ratio. colocated: every
    # replica runs both phases (as a single engine does) with the decode
    # section's settings; ratio and the prefill section do not apply.
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    ratio: str | None = None  # "P:D"; None only when sized by explicit counts
    replicas: int | None = Field(None, ge=1)  # total over both pools; a multiple of P+D
    prefill: PrefillPoolConfig = Field(default_factory=PrefillPoolConfig)
    decode: DecodePoolConfig = Field(default_factory=DecodePoolConfig)
    autoscale: AutoscaleConfig | None = None  # None: the sizes stay as configured (cluster.scale resizes)

    @model_validator(mode="before")
    @classmethod
    def _default_sizing(cls, data: Any) -> Any:
        # Fill the defaults on the input, not by mutating the frozen model, so
        # the validated tree (and dump_config) states the sizes that will run.
        if not isinstance(data, Mapping):
            return data
        if any(_replicas_of(data.get(k)) is not None for k in ("prefill", "decode")):
            return data  # explicit counts: nothing to invent
        data = dict(data)
        if data.get("ratio") is None:
            data["ratio"] = "1:1"
        if data.get("replicas") is None and isinstance(data["ratio"], str):
            try:
                data["replicas"] = sum(parse_ratio(data["ratio"]))
            except ValueError:
                pass  # the field validator reports the bad ratio
        return data

    @field_validator("ratio", mode="before")
    @classmethod
    def _check_ratio(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f'must be a quoted string "P:D", e.g. "2:1"; got {value!r}')
        p, d = parse_ratio(value)
        return f"{p}:{d}"

    @model_validator(mode="after")
    def _check_sizes(self) -> PoolsConfig:
        problems: list[tuple[str, str]] = []
        if self.colocated:
            for k in ("prefill", "decode"):
                if getattr(self, k).replicas is not None:
                    problems.append((f"{k}.replicas", "does not apply with mode colocated; set pools.replicas"))
            if self.autoscale is not None:
                problems.append(("autoscale", "is for mode disaggregated only (a colocated pool is resized with "
                                              "cluster.scale)"))
            if problems:
                raise FieldProblems(problems)
            return self
        p_n, d_n = self.prefill.replicas, self.decode.replicas
        if (p_n is None) != (d_n is None):
            missing = "decode" if d_n is None else "prefill"
            problems.append((f"{missing}.replicas", "required when the other pool's replicas is set (or use ratio + replicas)"))
        elif p_n is not None and d_n is not None:
            if self.ratio is not None:
                rp, rd = parse_ratio(self.ratio)
                if p_n * rd != d_n * rp:
                    problems.append(("ratio", f"{self.ratio} disagrees with prefill.replicas {p_n} and decode.replicas {d_n}"))
            if self.replicas is not None and self.replicas != p_n + d_n:
                problems.append(("replicas", f"{self.replicas} disagrees with prefill.replicas + decode.replicas = {p_n + d_n}"))
        elif self.replicas is not None:
            rp, rd = self.ratio_pair()
            if self.replicas % (rp + rd):
                problems.append(("replicas", f"{self.replicas} is not a multiple of {rp + rd} = {rp}+{rd} (ratio {rp}:{rd})"))
        if self.autoscale is not None and not problems:
            total = sum(self.counts())
            a = self.autoscale
            if not a.min_total <= total <= a.max_total:
                problems.append(("autoscale.min_total", f"the pools start with {total} workers, outside "
                                                        f"[min_total {a.min_total}, max_total {a.max_total}]"))
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def colocated(self) -> bool:
        """Whether every replica runs both phases (the one place that reads ``mode``)."""
        return self.mode == "colocated"

    def ratio_pair(self) -> tuple[int, int]:
        """The prefill:decode ratio; from explicit counts reduced by their gcd when no ratio is set."""
        if self.ratio is not None:
            return parse_ratio(self.ratio)
        p, d = self.prefill.replicas or 1, self.decode.replicas or 1
        g = math.gcd(p, d)
        return p // g, d // g

    def counts(self) -> tuple[int, int]:
        """(prefill replicas, decode replicas) to start; colocated: (0, replicas)."""
        if self.colocated:
            return 0, self.replicas if self.replicas is not None else 2
        if self.prefill.replicas is not None and self.decode.replicas is not None:
            return self.prefill.replicas, self.decode.replicas
        return self.counts_for_total(self.replicas if self.replicas is not None else sum(self.ratio_pair()))

    def counts_for_total(self, total: int) -> tuple[int, int]:
        """Split ``total`` replicas at the ratio (for scaling); ValueError unless a positive multiple of P+D."""
        return split_at_ratio(self.ratio_pair(), total)


def split_at_ratio(ratio: tuple[int, int], total: int) -> tuple[int, int]:
    """(prefill, decode) counts for ``total`` replicas at ``ratio``: 2:1 → 3 → (2, 1), 6 → (4, 2)."""
    p, d = ratio
    if total < 1 or total % (p + d):
        raise ValueError(f"{total} replicas cannot keep ratio {p}:{d}: the total must be a positive multiple of {p + d} = {p}+{d}")
    k = total // (p + d)
    return p * k, d * k


class KVTransferConfig(Settings):
    """How prompt KV moves from prefill to decode actors."""

    backend: Literal["gloo", "nccl", "grpc", "ray", "inproc"] = "gloo"
    # Pairs of workers on one node: "shm" moves their KV through shared memory
    # (one copy; chosen per pair, by Ray node id), "backend" through `backend`
    # like any other pair. Pairs on different nodes always use `backend`, and
    # nccl keeps every pair (GPU KV goes GPU to GPU).
    same_node: Literal[SAME_NODE_MODES] = DEFAULT_SAME_NODE  # type: ignore[valid-type]
    # shm: each receiver keeps pre-faulted shared-memory buffers for reuse, up
    # to this many bytes (beyond: one-off buffers, slower, freed after use).
    shm_pool_bytes: int = Field(DEFAULT_SHM_POOL_BYTES, ge=0, le=MAX_SHM_POOL_BYTES)
    timeout_s: float = Field(30, gt=0, le=MAX_WAIT_S)  # bound on every transfer wait
    # How long either side of a hand-off holds blocks for the other: reserved
    # decode blocks wait this long for their KV, pushed prefill KV this long
    # for the decode side's acknowledgement; then they are freed.
    lease_s: float = Field(30.0, gt=0, le=MAX_WAIT_S)
    chunk_bytes: int = Field(4 * MiB, ge=MIN_CHUNK_BYTES, le=1 * GiB)
    # The address each worker's transport binds and advertises to its peers:
    # one address (127.0.0.1 on one machine), or "auto": every worker uses
    # its own node's address as Ray knows it (a multi-node cluster, where
    # one value cannot be right for every pod).
    host: str = Field("127.0.0.1", min_length=1)
    # grpc backend: a push stream that sends nothing for this long is closed
    # (DEADLINE_EXCEEDED), and one sender holds at most this many open streams.
    stream_idle_s: float = Field(DEFAULT_STREAM_IDLE_S, gt=0, le=MAX_STREAM_IDLE_S)
    max_streams_per_peer: int = Field(DEFAULT_MAX_STREAMS_PER_PEER, ge=1, le=MAX_STREAMS_PER_PEER)
    # The cluster's KV-plane secret: receivers accept only transfers whose
    # sender proves it (HMAC). From an environment variable or a file; unset
    # means no check, which is allowed only on loopback.
    secret_env: str | None = None
    secret_file: str | None = None

    @model_validator(mode="after")
    def _reachable_needs_secret(self) -> KVTransferConfig:
        problems: list[tuple[str, str]] = []
        if self.secret_env is not None and self.secret_file is not None:
            problems.append(("secret_file", "set secret_env or secret_file, not both"))
        if is_unspecified(self.host):
            problems.append(("host", f"{self.host} is not an address peers can reach; give this node's address, "
                                     "or auto (each node's own)"))
        elif not is_loopback(self.host) and self.secret_env is None and self.secret_file is None:
            problems.append(("host", f"{self.host} is reachable from other machines: set secret_env or secret_file "
                                     "so receivers accept only pushes proven with the cluster secret"))
        if problems:
            raise FieldProblems(problems)
        return self


class RouterConfig(Settings):
    """The client-facing gRPC server (and its OpenAI-compatible HTTP port)."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0: pick a free port (once, at launch: every replica serves it)
    # Router processes serving ``port`` together (SO_REUSEPORT; the kernel spreads
    # connections over them). 1: the router runs inside the launch process; more:
    # detached Ray actors (num_cpus=0) on the launch's node, restarted by Ray when
    # one dies. Replica i serves /metrics on metrics_port + i.
    replicas: int = Field(default_factory=lambda: default_router_replicas(), ge=1, le=64)
    policy: Literal["round_robin", "least_loaded", "prefix_aware"] = "least_loaded"
    # prefix_aware: cost = outstanding tokens - prefix_cache_weight * tokens the worker caches (router/policy.py)
    prefix_cache_weight: float = Field(1.0, ge=0, le=1000)
    # Conditional disaggregation: the decode worker prefills a prompt itself (no prefill
    # worker, no KV transfer) when the part it does not cache is at most this many tokens
    # (0: never on that ground) ...
    conditional_prefill_max_tokens: int = Field(0, ge=0)
    # ... or when it caches at least this share of the prompt (null: never on that ground).
    conditional_prefill_min_cached_ratio: float | None = Field(None, gt=0, le=1)
    # ... except that a prompt the decode worker would take on the short ground still
    # goes to a prefill worker when the decode worker has a batch running and that
    # prefill worker is idle (caching at least as much of it): no stall of the batch.
    conditional_prefill_offload_when_idle: bool = True
    max_queued: int = Field(256, ge=1)  # beyond this, new requests get RESOURCE_EXHAUSTED (0 would refuse all)
    request_timeout_s: float = Field(600, gt=0, le=MAX_WAIT_S)  # then DEADLINE_EXCEEDED, KV freed
    queue_timeout_s: float = Field(30, gt=0, le=MAX_WAIT_S)  # longest wait for KV room before RESOURCE_EXHAUSTED
    max_request_bytes: int = Field(1 * MiB, ge=1024)  # larger requests get RESOURCE_EXHAUSTED
    max_attempts: int = Field(3, ge=1)  # a request whose worker dies is retried / resumed up to this
    transfer_retries: int = Field(1, ge=0)  # pushes of one KV again before recomputing it elsewhere
    drain_grace_s: float = Field(30, ge=0, le=MAX_WAIT_S)  # on stop: how long in-flight requests may take to finish
    # Prometheus /metrics, unauthenticated: so it binds to loopback only
    # (scrape it from the same host or pod: a sidecar, kubectl port-forward).
    metrics_port: int | None = Field(9464, ge=0, le=65535)  # None: off; 0: a free port
    metrics_host: str = "127.0.0.1"
    # The OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    # /health) on router.host, same process, token and TLS as the gRPC port.
    http_port: int | None = Field(8000, ge=0, le=65535)  # None: off; 0: a free port
    # TLS for clients: both paths or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Bearer-token auth: the token from an environment variable or a file
    # (never from the YAML itself, which gets committed and logged).
    auth_token_env: str | None = None
    auth_token_file: str | None = None

    @model_validator(mode="after")
    def _secure_when_reachable(self) -> RouterConfig:
        problems: list[tuple[str, str]] = []
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            problems.append((missing, "set both tls_cert and tls_key, or neither"))
        if self.auth_token_env is not None and self.auth_token_file is not None:
            problems.append(("auth_token_file", "set auth_token_env or auth_token_file, not both"))
        if not is_loopback(self.host):
            # A token without TLS crosses the network in clear text; TLS without
            # a token lets anyone in. Off loopback the router needs both.
            missing = [what for what, ok in (("auth_token_env or auth_token_file", self.token_set),
                                             ("tls_cert and tls_key", self.tls_set)) if not ok]
            if missing:
                problems.append(("host", f"{self.host} is reachable from other machines: set {' and '.join(missing)}"))
        if not is_loopback(self.metrics_host):
            problems.append(("metrics_host", f"{self.metrics_host} is not loopback: /metrics has no authentication, "
                                             "so it binds to 127.0.0.1 (scrape it from the same host or pod)"))
        if self.metrics_port is not None and self.metrics_port != 0:
            last = self.metrics_port + self.replicas - 1  # replica i serves /metrics on metrics_port + i
            if self.metrics_port <= self.port <= last:
                problems.append(("metrics_port", f"{self.metrics_port}..{last} (one per router replica) includes "
                                                 f"router.port {self.port}; give /metrics ports of their own"))
            if last > 65535:
                problems.append(("metrics_port", f"{self.metrics_port} + {self.replicas} replicas passes 65535"))
        if self.replicas > 1 and not sys.platform.startswith("linux"):
            problems.append(("replicas", f"{self.replicas} router processes share one port through SO_REUSEPORT, "
                                         "which gRPC sets on Linux only; use 1 here"))
        if self.http_port is not None and self.http_port != 0:
            taken = {self.port} | ({self.metrics_port + i for i in range(self.replicas)} if self.metrics_port else set())
            if self.http_port in taken:
                problems.append(("http_port", f"{self.http_port} is router.port or a router's metrics port too; "
                                              "give HTTP its own port"))
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def token_set(self) -> bool:
        """Whether clients must present a bearer token."""
        return self.auth_token_env is not None or self.auth_token_file is not None

    @property
    def tls_set(self) -> bool:
        """Whether the client port serves TLS."""
        return self.tls_cert is not None and self.tls_key is not None


class RayConfig(Settings):
    """Where the launcher finds (or starts) Ray."""

    address: str | None = None  # None: join a running cluster ("auto") if any, else start a local one
    namespace: str = Field("splitserve", min_length=1)
    num_cpus: int | None = Field(None, ge=1)  # CPUs of a local cluster started by the launcher


class ClusterConfig(Settings):
    """The whole deployment: the root of the YAML file."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    kvtransfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    # Field validators (not a model validator) so these run even when another
    # section is invalid: every problem is reported in one go.
    @field_validator("pools")
    @classmethod
    def _kv_holds_a_full_request(cls, pools: PoolsConfig, info: ValidationInfo) -> PoolsConfig:
        # A pool whose whole KV cache is shorter than the longest request it
        # must accept refuses (or preempts forever) every long request.
        model = info.data.get("model")
        if model is None or model.max_model_len is None:
            return pools  # the model's own length is checked before start (cluster.preflight)
        problems = []
        sections = [("decode", pools.decode)] + ([] if pools.colocated else [("prefill", pools.prefill)])
        for name, section in sections:
            if section.num_blocks is not None and section.num_blocks * section.block_size < model.max_model_len:
                problems.append((f"{name}.num_blocks", f"{section.num_blocks} blocks of {section.block_size} tokens "
                                 f"hold {section.num_blocks * section.block_size} tokens, less than model.max_model_len "
                                 f"{model.max_model_len}"))
        if problems:
            raise FieldProblems(sorted(problems))
        return pools

    @field_validator("pools")
    @classmethod
    def _one_kv_dtype(cls, pools: PoolsConfig, info: ValidationInfo) -> PoolsConfig:
        # The KV cache is kept in each pool's dtype and handed over as raw bytes: a prefill
        # pool whose KV dtype differs from decode's would hand over KV decode cannot read.
        model = info.data.get("model")
        if model is None or pools.colocated:
            return pools
        p_dtype, d_dtype = pools.prefill.dtype or model.dtype, pools.decode.dtype or model.dtype
        if p_dtype != d_dtype:
            raise FieldProblems([("prefill.dtype", f"the KV hand-off needs one KV dtype: prefill computes in {p_dtype}, "
                                  f"decode in {d_dtype} (set both pools' dtype alike; quantization may differ)")])
        return pools

    @field_validator("pools")
    @classmethod
    def _compile_traces_the_format(cls, pools: PoolsConfig, info: ValidationInfo) -> PoolsConfig:
        model = info.data.get("model")
        if model is not None and pools.decode.compile and \
                (pools.decode.quantization or model.quantization) in UNCOMPILABLE_QUANTIZATIONS:
            raise FieldProblems([("decode.compile", "the compiled decode step cannot trace the w8a8 format's "
                                  "kernel (an fbgemm operator); set compile: false or another quantization")])
        return pools

    @field_validator("kvtransfer")
    @classmethod
    def _backend_fits_cluster(cls, kv: KVTransferConfig, info: ValidationInfo) -> KVTransferConfig:
        if kv.backend == "inproc":
            raise FieldProblems([("backend", "inproc only works inside one process, not across a cluster; use gloo, grpc or ray")])
        pools = info.data.get("pools")  # absent when pools itself failed validation
        if kv.backend == "nccl" and pools is not None and (pools.prefill.num_gpus < 1 or pools.decode.num_gpus < 1):
            raise FieldProblems([("backend", "nccl needs GPUs: set pools.prefill.num_gpus and pools.decode.num_gpus >= 1")])
        return kv


# ---------------------------------------------------------------- loading


def load_config(path_or_text: str | os.PathLike[str]) -> ClusterConfig:
    """Load and validate a config from a file path or from YAML text.

    A ``Path``, or a one-line ``str`` that ends in ``.yaml``/``.yml`` or names an
    existing file, is read as a file; any other ``str`` is YAML text. Raises
    ConfigError naming the file for an unreadable file, invalid YAML (duplicate
    keys included), a top level that is not a mapping, and every invalid field.
    """
    text, source = str(path_or_text), "<text>"
    is_file = isinstance(path_or_text, os.PathLike) or (
        "\n" not in text and (text.endswith((".yaml", ".yml")) or (text.strip() != "" and os.path.isfile(text)))
    )
    if is_file:
        source = str(path_or_text)
        try:
            text = Path(path_or_text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(source, [f"cannot read the file: {exc}"]) from exc
    try:
        data = read_yaml(text)
    except ValueError as exc:
        raise ConfigError(source, [str(exc)]) from exc
    return parse_config({} if data is None else data, source=source)


def parse_config(data: Any, source: str = "<dict>") -> ClusterConfig:
    """Validate an already-parsed mapping; raises ConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, [f"top level must be a mapping of sections (model, pools, ...), got {type(data).__name__}"])
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [line for err in exc.errors() for line in describe_error(err, ClusterConfig)]) from None


def dump_config(cfg: ClusterConfig) -> str:
    """The config as YAML (every field, defaults included); ``load_config`` reads it back unchanged."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
