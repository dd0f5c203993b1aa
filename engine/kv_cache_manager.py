"""Paged KV memory bookkeeping: a block pool and per-sequence block tables.

Torch-free on purpose: the tensors that hold K and V live in
:mod:`engine.kv_cache`; this module only decides which block ids a sequence
owns. Blocks are reference counted so that a later prefix cache can share a
block between sequences; a block returns to the free list when its count
drops to zero.
"""

from __future__ import annotations

from collections import deque


class BlockPoolError(RuntimeError):
    """A caller broke the pool's contract (double free, unknown block)."""


class BlockPool:
    """A fixed set of ``num_blocks`` KV blocks with a free list and refcounts."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._refcount[block_id]

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free blocks (refcount 1 each), or ``None`` if fewer are free.

        All-or-nothing, so a failed allocation never leaves blocks half-taken.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        """Share already-allocated blocks with one more owner."""
        for b in blocks:
            if self._refcount[b] == 0:
                raise BlockPoolError(f"block {b} is free; cannot share it")
        for b in blocks:
            self._refcount[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero become free."""
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise BlockPoolError(f"block {b} is not in this pool")
            if self._refcount[b] == 0:
                raise BlockPoolError(f"block {b} freed twice")
        for b in blocks:
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens (ceiling division)."""
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Facade over the pool: which blocks each sequence owns.

    ``allocate_slots`` returns ``False`` for "no room now" rather than
    raising, so the scheduler can preempt or wait.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        have = len(self._tables.get(seq_id, ()))
        return blocks_needed(num_tokens, self.block_size) - have <= self.pool.num_free

    def allocate_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens in total."""
        table = self._tables.setdefault(seq_id, [])
        missing = blocks_needed(num_tokens, self.block_size) - len(table)
        if missing <= 0:
            return True
        new = self.pool.allocate(missing)
        if new is None:
            if not table:
                del self._tables[seq_id]
            return False
        table.extend(new)
        return True

    def free(self, seq_id: str) -> None:
        """Release every block of ``seq_id`` (a no-op if it holds none)."""
        table = self._tables.pop(seq_id, None)
        if table:
            self.pool.free(table)

    def slot(self, seq_id: str, position: int) -> int:
        """Flat slot index (block * block_size + offset) of a token position."""
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
