"""Continuous-batching scheduler (torch-free).

Each step it decides which tokens of which sequences the model computes:

1. Running sequences, oldest first, get their uncomputed tokens (one for a
   decoding sequence, a chunk for one still prefilling), within the per-step
   token budget. When the block pool cannot hold a sequence's new tokens, the
   most recently admitted running sequence is preempted: its blocks are freed
   and it goes back to the front of the queue, to be recomputed later from
   prompt + tokens generated so far. Preemption can always make progress,
   because the engine refuses any request that could not fit the pool alone.
2. If nothing was preempted, waiting sequences are admitted in arrival order
   while the budget, ``max_running`` and free blocks allow. A prompt longer
   than the budget is admitted with its first chunk and continues next step.
   With prefix caching, a sequence admitted with no blocks starts with every
   leading full block of its tokens that is cached (shared, not computed):
   its first chunk starts after them, and they cost no budget. A preempted
   sequence finds its own blocks that way when it is readmitted.
   A prompt does not join a step that already admitted a shorter one when it
   is longer than both those prompts' tokens and :data:`JOIN_TOKENS`: a
   step's prompts all finish with its slowest, so a short prompt is never
   held for a long one that queued after it; the long one leads the next
   step. The queue's head is always admitted, so nothing starves.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache_manager import KVCacheManager
from engine.sequence import Sequence, SequenceStatus

# Prompts up to this many tokens always share a step (batching short prompts pays:
# one pass over the weights for all); a longer one waits for the next step rather
# than make the prompts admitted before it wait for its prefill.
JOIN_TOKENS = 256


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute ``seq.token_ids[start:start + num_tokens]`` this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Owns the waiting queue and the running batch; see the module docstring."""

    def __init__(self, kv: KVCacheManager, max_running: int, max_batched_tokens: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1, got {max_batched_tokens}")
        self.kv = kv
        self.max_running = max_running
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.request_id)

    def detach(self, seq: Sequence) -> None:
        """Take ``seq`` out of the running batch but keep its blocks (export)."""
        self.running.remove(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_batched_tokens
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            n = min(seq.num_uncomputed_tokens, budget)
            if self._allocate_or_preempt(seq, seq.num_computed_tokens + n, out):
                out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
                idx += 1
            # else: seq itself was preempted; it was the tail, so the loop ends.
        if out.preempted:
            # Admitting now would only take the blocks just freed for the
            # sequences that were already running.
            self._stamp_scheduled(out.chunks)
            return out
        admitted = 0  # tokens of prompts admitted from the queue this step
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            prefix = None
            if seq.num_computed_tokens == 0 and not self.kv.block_table(seq.request_id):
                prefix = self.kv.match_prefix(seq.token_ids, tails=True)  # computed here: a cached tail may continue it
            start = seq.num_computed_tokens + (prefix.num_tokens if prefix else 0)
            n = min(seq.num_tokens - start, budget)
            if admitted and n > max(admitted, JOIN_TOKENS):
                break  # it would hold the shorter prompts admitted before it: it leads the next step
            if not self.kv.allocate_slots(seq.request_id, start + n, prefix):
                break
            if prefix is not None:
                seq.num_computed_tokens = start
                if seq.num_cached_tokens is None:  # the hit rate counts each request's first admission
                    seq.num_cached_tokens = prefix.num_tokens
                    self.kv.record_lookup(seq.num_tokens, prefix.num_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
            admitted += n
        self._stamp_scheduled(out.chunks)
        return out

    @staticmethod
    def _stamp_scheduled(chunks: list[ScheduledChunk]) -> None:
        """Stamp each sequence's first scheduling (imported ones join ``running`` directly)."""
        now = time.time()
        for c in chunks:
            c.seq.timestamps.setdefault("scheduled", now)

    def _allocate_or_preempt(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(seq.request_id, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
