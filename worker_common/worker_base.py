"""What the prefill and decode workers share: a model in an engine on its
stepping thread, a KV transport, the control calls the pool manager and
router use, and lease reaping."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from analysis.machine_peaks import MachinePeaks, measure_peaks_fast, peak_dtype
from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from engine.model_loader import LoadedModel, load_model
from engine.passing_thread import in_passing_thread
from kvtransfer.endpoints import Endpoint
from kvtransfer.factory import make_transport
from kvtransfer.ray_transport import KVTransferActorMixin
from worker_common.messages import ModelLimits
from worker_common.threads import apply_worker_threads
from worker_common.worker_config import HandoffSettings, ModelConfig
from worker_common.worker_status import MAX_PUBLISHED_HASHES, KVTransferStats, PrefixCacheReport, WorkerStatus

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 0.5
TOMBSTONE_S = 120.0  # how long an aborted id stays refused (longer than any call in flight)
LATENCY_SAMPLES = 64  # per-request latencies a worker keeps for its status (the autoscaler's SLO signals)


@dataclass(frozen=True)
class Preloaded:
    """A model already in memory and the peaks measured with it: what a worker that switches
    role in place (``cluster.role_worker``) hands its next role, so nothing is loaded twice."""

    model: LoadedModel
    peaks: MachinePeaks | None


class WorkerBase(KVTransferActorMixin):
    """Base of both worker kinds (plain classes the pool manager wraps with ``ray.remote``)."""

    kind = "worker"

    def __init__(self, worker_id: str, *, model: ModelConfig, engine_args: dict[str, Any], batch_wait_s: float,
                 handoff: HandoffSettings, threads: int | None = None, measure_peaks: bool = True,
                 preloaded: Preloaded | None = None) -> None:
        self.worker_id = worker_id
        # Before the model loads: torch's thread pool is sized by the first parallel op.
        self.threads = apply_worker_threads(threads)
        log.info("%s computes on %d torch threads", worker_id, self.threads)

        def build() -> tuple[Preloaded, LLMEngine]:
            ready = preloaded
            if ready is None:
                # Peaks measured here, on this worker's own cores and in its compute dtype (a bfloat16
                # matmul peaks at ~2.3x float32's here), so its MBU/MFU compare like with like.
                ready = Preloaded(load_model(model.name, dtype=model.dtype, max_model_len=model.max_model_len,
                                             quantization=model.quantization),
                                  measure_peaks_fast(peak_dtype(model.dtype)) if measure_peaks else None)
            return ready, LLMEngine(ready.model, peaks=ready.peaks, **engine_args)

        # The load's torch work runs on a thread that ends with it, so that the engine's step
        # thread is this process's only OpenMP team (engine.passing_thread says why it matters).
        self.preloaded, engine = in_passing_thread(build, name=f"{worker_id}-load")
        loaded = self.preloaded.model
        self._limits = ModelLimits(model.name, loaded.max_model_len, int(loaded.config.vocab_size))
        self.layout = engine.layout
        self.engine = AsyncEngine(engine, batch_wait_s=batch_wait_s)
        self.lease_s = handoff.lease_s
        self.kv_transport = make_transport(handoff.backend, worker_id, **handoff.transport_kwargs())
        self.requests_served = 0
        self.outstanding_tokens = 0
        self._reapers: list[asyncio.Task] = []
        # Ids the router aborted: a call for one of them that arrives late
        # (after the abort) is refused instead of holding blocks nobody wants.
        self._aborted: dict[str, float] = {}
        # (finished at, seconds) of recent requests: the kind's own latency (prefill: its part of
        # TTFT; decode: TPOT), which the autoscaler compares with the SLO targets.
        self.latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_SAMPLES)

    # ------------------------------------------------------------- control
    def ping(self) -> str:
        return self.worker_id

    def pid(self) -> int:
        """This actor's process id (fault-injection tests and the soak kill it)."""
        return os.getpid()

    def limits(self) -> ModelLimits:
        """The served model's name and limits, for the router's validation."""
        return self._limits

    def endpoint(self) -> Endpoint:
        """How peers reach this worker's KV transport."""
        return self.kv_transport.endpoint()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else os.uname().nodename

    def status(self) -> WorkerStatus:
        """Load and KV occupancy (the kind adds its own counters)."""
        engine = self.engine.engine
        stats = engine.stats()
        cache = PrefixCacheReport(
            enabled=engine.kv.enable_caching, block_size=engine.kv.block_size, cache_key=engine.kv_cache_key,
            cached_blocks=stats["cached_blocks"], queried_tokens=stats["prefix_queried_tokens"],
            hit_tokens=stats["prefix_hit_tokens"], evictions=stats["cache_evictions"],
            block_hashes=engine.cached_block_hashes(MAX_PUBLISHED_HASHES))
        return WorkerStatus(
            worker_id=self.worker_id,
            kind=self.kind,
            running=stats["running"],
            waiting=stats["waiting"],
            reserved=stats["reserved"],
            outstanding_tokens=self.outstanding_tokens,
            free_blocks=stats["free_blocks"],
            used_blocks=stats["used_blocks"],
            num_blocks=stats["num_blocks"],
            requests_served=self.requests_served,
            preemptions=stats["preemptions"],
            step_stats=self.engine.engine.step_stats(),
            kv_transfer=KVTransferStats(**self.kv_transport.stats()),
            prefix_cache=cache,
            forks=stats["forks"],
        )

    def shutdown(self) -> None:
        for task in self._reapers:
            task.cancel()
        self.engine.close()
        self.kv_transport.close()

    # ------------------------------------------------------------ aborting
    def _tombstone(self, request_id: str) -> None:
        now = time.monotonic()
        if len(self._aborted) > 10_000:  # bounded: forget the expired ones
            for key in [k for k, t in self._aborted.items() if t <= now]:
                del self._aborted[key]
        self._aborted[request_id] = now + TOMBSTONE_S

    def _was_aborted(self, request_id: str) -> bool:
        deadline = self._aborted.get(request_id)
        return deadline is not None and deadline > time.monotonic()

    # -------------------------------------------------------------- leases
    def _reap(self, deadlines: dict[str, float], on_expire: Callable[[str], Awaitable[Any]]) -> None:
        """Start (once per ``deadlines``) a task that calls ``on_expire`` for each id past its deadline.

        An ``on_expire`` that raises is logged and the reaping goes on: one bad
        lease must not leave every later one holding its blocks for good.
        """
        if any(getattr(t, "deadlines", None) is deadlines for t in self._reapers):
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(REAP_INTERVAL_S)
                now = time.monotonic()
                for key in [k for k, deadline in deadlines.items() if deadline <= now]:
                    deadlines.pop(key, None)
                    try:
                        await on_expire(key)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("%s: expiring the lease of %s failed", self.worker_id, key)

        task = asyncio.get_running_loop().create_task(loop())
        task.deadlines = deadlines  # type: ignore[attr-defined]
        self._reapers.append(task)
