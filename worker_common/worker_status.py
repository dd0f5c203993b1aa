"""A worker's status report: what the router's directory, its ``ClusterStatus``
RPC, the metrics collector and the pool manager's drain read of one worker.

One frozen value, returned by ``status()`` on every worker kind (it crosses
the Ray actor boundary as is). Counters common to all kinds are required
fields; a counter only one kind keeps has an explicit default (0), so that a
reader never has to guess a missing key.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.step_stats import StepStatsSnapshot


@dataclass(frozen=True)
class KVTransferStats:
    """The worker's KV transport counters since it started (its ``stats()``), plus push time.

    ``seconds_sent`` is measured by prefill workers only (export + send + the
    receiver's acknowledgement, summed over successful pushes); ``None`` on
    the other kinds, which measure no transfer time.
    """

    chunks_sent: int = 0
    chunks_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    refused_unauthenticated: int = 0  # connections refused for a missing or wrong cluster token
    seconds_sent: float | None = None


#: At most this many cached block hashes ride on one status report (8 bytes
#: each): bounds the digest a worker publishes for prefix-aware routing.
MAX_PUBLISHED_HASHES = 4096


@dataclass(frozen=True)
class PrefixCacheReport:
    """A worker's prefix cache: counters since it started, and what it holds.

    ``block_hashes``: the chained hashes (:func:`engine.kv_cache_manager.hash_block`)
    of up to :data:`MAX_PUBLISHED_HASHES` cached blocks, most recently used
    first, under ``cache_key`` and ``block_size``; what the router's prefix
    index learns from each status poll (so it is as stale as the poll).
    """

    enabled: bool = False
    block_size: int = 0
    cache_key: str = ""
    cached_blocks: int = 0  # free blocks holding a cached prefix (evictable; counted in free_blocks)
    queried_tokens: int = 0  # tokens looked up at admission or reservation
    hit_tokens: int = 0  # of those, found cached (not computed or moved)
    evictions: int = 0
    block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True)
class WorkerStatus:
    """Load, KV occupancy and counters of one worker, as it last reported them."""

    worker_id: str
    kind: str  # "prefill" | "decode" | "colocated"
    running: int  # sequences in the running batch
    waiting: int  # sequences queued in the engine
    reserved: int  # KV reservations awaiting their transfer
    outstanding_tokens: int  # tokens of requests accepted and not finished
    free_blocks: int  # KV cache blocks free (reserved ones count as used; cached, evictable ones as free)
    used_blocks: int
    num_blocks: int
    requests_served: int  # requests finished since the worker started
    preemptions: int
    step_stats: StepStatsSnapshot
    kv_transfer: KVTransferStats
    held: int = 0  # prefill: pushed KV held until the decode side acknowledges it
    tokens_prefilled: int = 0  # prefill: prompt tokens prefilled
    tokens_generated: int = 0  # decode and colocated: output tokens generated
    prefills: int = 0  # prefill: prompts prefilled (a request with n samples counts once)
    kv_imports: int = 0  # decode: prefilled KVs imported (a request with n samples counts once)
    forks: int = 0  # samples forked from a prompt already in KV (n - 1 per request with n samples)
    # (finished at time.time(), seconds) of the last requests, oldest first: prefill, from
    # the call's arrival to the KV pushed (the worker's part of TTFT); decode, TPOT.
    recent_latencies: tuple[tuple[float, float], ...] = ()
    prefix_cache: PrefixCacheReport = PrefixCacheReport()

    @property
    def prefix_hit_rate(self) -> float | None:
        """Prompt tokens found cached / looked up (``None`` before any lookup)."""
        c = self.prefix_cache
        return c.hit_tokens / c.queried_tokens if c.queried_tokens else None

    @property
    def tokens_processed(self) -> int:
        """The tokens of this worker's own phase: prompt tokens prefilled on a
        prefill worker, output tokens generated on the other kinds."""
        return self.tokens_prefilled if self.kind == "prefill" else self.tokens_generated

    @property
    def busy(self) -> bool:
        """Anything running, queued, reserved, held or outstanding (a worker being drained waits for False)."""
        return self.running + self.waiting + self.reserved + self.held + self.outstanding_tokens != 0
