"""Paged KV memory bookkeeping: a block pool, per-sequence block tables and
the prefix cache.

Torch-free on purpose: the tensors that hold K and V live in
:mod:`engine.kv_cache`; this module only decides which block ids a sequence
owns.

Prefix caching (``enable_caching``): once a block is *full* and its tokens
computed, it is named by a chained hash (:func:`hash_block`: the parent
block's hash, the block's token ids and a KV-compatibility key — model,
dtype or quantization, layout — so that KV written under one format is never
read under another). A block whose last owner frees it keeps its contents
and its hash: it is *cached* and evictable, and counts as free. A new
sequence takes every leading full block of its tokens that is cached
(:meth:`KVCacheManager.match_prefix`) instead of computing it again; a block
is evicted (its hash forgotten, its slots reused) only when a fresh block is
needed and no never-hashed block is left, least recently used first.

Blocks are reference counted: a cached block shared by several sequences
returns to the free (evictable) set only when its last owner frees it, so
preempting, cancelling or aborting one sharer never frees what another
still reads. A full block is never written again (positions only grow, and
a sequence that restarts frees its blocks first), which is what makes
sharing safe.

Forking (``n`` samples of one prompt, :meth:`KVCacheManager.fork`): a child
sequence takes one more reference to every block of its parent. The one
block that is not full of computed tokens (the prompt's partly filled last
block) is *copy-on-write* for every sharer: the first of them to grow
(:meth:`KVCacheManager.allocate_slots`) while the block is still shared
gets a fresh block and a pending copy (:meth:`KVCacheManager.take_copies`,
which the engine applies to the KV tensors before the step writes), and
drops its reference to the shared one; the last sharer writes in place.
So ``n`` samples hold the prompt's full blocks once plus ``n`` tails.
A group whose copies must be paid for in advance (a decode worker's
reservation) holds *spare* blocks (:meth:`KVCacheManager.hold_spares`),
handed to the children at fork and used by their copies before the pool.

Tails: a finished sequence's last, partly filled block is cached too
(:meth:`KVCacheManager.cache_tail`), named by its parent's hash and its
``L`` < ``block_size`` computed tokens. The next turn of a conversation
shares the previous turn's tokens up to the middle of that block and then
diverges (its new message), so full blocks alone would leave up to a block
of the history to compute again. A tail is never shared: a sequence whose
tokens continue it (``match_prefix(..., tails=True)``) gets a fresh block
and a copy of the tail's ``L`` tokens (:meth:`KVCacheManager.take_copies`),
the source held until the copy is taken, so the cached tail stays as it was.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass


class BlockPoolError(RuntimeError):
    """A caller broke the pool's contract (double free, unknown block)."""


_PARENT = struct.Struct("<Q")


def hash_block(parent: int | None, token_ids: Sequence[int], cache_key: str) -> int:
    """The 64-bit name of one full block: its parent's name, its token ids and the KV-compatibility key.

    Stable across processes and machines (blake2b, little-endian packing), so
    a router can compute the same names as the workers for routing.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(b"\x01" if parent is None else b"\x00" + _PARENT.pack(parent))
    h.update(cache_key.encode())
    h.update(b"\x00")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little")


def chain_hashes(token_ids: Sequence[int], block_size: int, cache_key: str,
                 max_blocks: int | None = None, start: Sequence[int] = ()) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (at most ``max_blocks``).

    ``start``: hashes of the first blocks, already known (the chain goes on after them).
    """
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    out = list(start)
    parent = out[-1] if out else None
    for i in range(len(out), n):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], cache_key)
        out.append(parent)
    return out


class BlockPool:
    """A fixed set of ``num_blocks`` KV blocks with refcounts and a cache of hashed blocks.

    A block with refcount 0 is free: either *plain* (never hashed, or its
    hash dropped) or *cached* (hashed; reusable by :meth:`acquire` until
    :meth:`allocate` evicts it, least recently freed first).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # plain free blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached free blocks, LRU first
        self._refcount = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> its hash
        self._by_hash: OrderedDict[int, int] = OrderedDict()  # hash -> block, least recently used first
        self._tails: set[int] = set()  # hashes that name a partly filled block (never routed on)
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached ones included: they can be evicted)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a cached prefix (evictable)."""
        return len(self._evictable)

    @property
    def num_hashed(self) -> int:
        """Blocks with a hash, held or free."""
        return len(self._by_hash)

    def refcount(self, block_id: int) -> int:
        return self._refcount[block_id]

    def lookup(self, block_hash: int) -> int | None:
        """The block cached under ``block_hash``, if any."""
        return self._by_hash.get(block_hash)

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free blocks (refcount 1 each), or ``None`` if fewer are free.

        Plain blocks go first; then cached ones are evicted, least recently
        used first. All-or-nothing, so a failed allocation never leaves
        blocks half-taken.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            return None
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                h = self._hash_of.pop(b)
                del self._by_hash[h]
                self._tails.discard(h)
                self.evictions += 1
            self._refcount[b] = 1
            blocks.append(b)
        return blocks

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take one more reference to cached blocks (held or free); a free one leaves the evictable set."""
        for b in blocks:
            if b not in self._hash_of:
                raise BlockPoolError(f"block {b} is not cached; cannot acquire it")
        for b in blocks:
            if self._refcount[b] == 0:
                del self._evictable[b]
            self._refcount[b] += 1
            self._by_hash.move_to_end(self._hash_of[b])

    def incref(self, blocks: list[int]) -> None:
        """Share already-allocated blocks with one more owner."""
        for b in blocks:
            if self._refcount[b] == 0:
                raise BlockPoolError(f"block {b} is free; cannot share it")
        for b in blocks:
            self._refcount[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block reaching zero becomes free (cached if hashed)."""
        for b in blocks:
            if not 0 <= b < self.num_blocks:
                raise BlockPoolError(f"block {b} is not in this pool")
            if self._refcount[b] == 0:
                raise BlockPoolError(f"block {b} freed twice")
        # Later blocks of a sequence depend on earlier ones: free them
        # first, so eviction (LRU) takes a chain's tail before its head.
        for b in reversed(blocks):
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def register(self, block_id: int, block_hash: int, tail: bool = False) -> bool:
        """Name a held, computed block by its hash (``tail``: a partly filled one); ``False`` if the
        hash already names another block (that one stays the cached copy) or this block has a name."""
        if self._refcount[block_id] == 0:
            raise BlockPoolError(f"block {block_id} is free; only a held block can be cached")
        if block_hash in self._by_hash or block_id in self._hash_of:
            return False
        self._by_hash[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        if tail:
            self._tails.add(block_hash)
        return True

    def recent_hashes(self, limit: int) -> tuple[int, ...]:
        """Up to ``limit`` hashes of cached full blocks, most recently used first (tails are
        matched only inside a worker: a router's index names full blocks).

        Safe to call from another thread than the one that allocates (a
        worker's status call): ``list()`` copies the keys in one step under
        the GIL, where iterating would fail if the engine changed them meanwhile.
        """
        keys = [h for h in list(self._by_hash) if h not in self._tails]
        return tuple(reversed(keys[-limit:])) if limit > 0 else ()


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens (ceiling division)."""
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class PrefixMatch:
    """The leading cached full blocks of a token sequence (:meth:`KVCacheManager.match_prefix`),
    and the cached tail that continues them, if one was asked for and found."""

    blocks: tuple[int, ...] = ()
    hashes: tuple[int, ...] = ()
    num_tokens: int = 0  # tokens these blocks hold, and the tail's
    tail_block: int | None = None  # a cached partly filled block whose tokens come next (copied, not shared)
    tail_tokens: int = 0  # its tokens that match


@dataclass(frozen=True)
class PrefixCacheStats:
    """Prefix-cache counters since the manager was made."""

    queried_tokens: int = 0  # tokens of sequences looked up when they were first admitted
    hit_tokens: int = 0  # of those, tokens found cached (not computed)
    evictions: int = 0  # cached blocks whose contents were dropped for reuse
    cached_blocks: int = 0  # free blocks that still hold a cached prefix (evictable, counted as free)

    @property
    def hit_rate(self) -> float | None:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else None


class KVCacheManager:
    """Facade over the pool: which blocks each sequence owns, and the prefix cache.

    ``allocate_slots`` returns ``False`` for "no room now" rather than
    raising, so the scheduler can preempt or wait. ``cache_key`` names the
    KV format (model, dtype or quantization, layout): blocks are only shared
    between sequences whose KV has the same key, and since a manager holds
    one format, the key is part of every block hash.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = False,
                 cache_key: str = "") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.cache_key = cache_key
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[int]] = {}  # seq -> hashes of its leading full, computed blocks
        self._cow: dict[str, int] = {}  # seq -> index in its table of a block shared at a fork that it will write
        self._spares: dict[str, list[int]] = {}  # seq -> blocks held for its (or its children's) copies on write
        self._copies: list[tuple[int, int]] = []  # (source, destination) block copies the engine has yet to do
        self._tail_sources: dict[int, int] = {}  # destination -> cached tail held until its copy is taken
        self.queried_tokens = 0
        self.hit_tokens = 0

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

    # --------------------------------------------------------------- prefix
    def match_prefix(self, token_ids: Sequence[int], max_tokens: int | None = None,
                     tails: bool = False) -> PrefixMatch:
        """The leading full blocks of ``token_ids`` that are cached, up to ``max_tokens`` tokens.

        By default at least the last token is left out (``len - 1``): a
        sequence must compute one token to have logits to sample from.
        ``tails``: also the longest cached tail (:meth:`cache_tail`) that
        continues the matched blocks — for a sequence computed here, whose
        first write then goes to a copy of it; not for KV imported from
        elsewhere, which starts at a block boundary.
        Takes nothing; pass the match to :meth:`allocate_slots`.
        """
        if not self.enable_caching:
            return PrefixMatch()
        limit = len(token_ids) - 1 if max_tokens is None else min(max_tokens, len(token_ids))
        blocks: list[int] = []
        hashes: list[int] = []
        parent = None
        bs = self.block_size
        for i in range(max(limit, 0) // bs):
            parent = hash_block(parent, token_ids[i * bs:(i + 1) * bs], self.cache_key)
            block = self.pool.lookup(parent)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        matched = len(blocks) * bs
        if tails:
            after = hashes[-1] if hashes else None
            for length in range(min(limit - matched, bs - 1), 0, -1):
                block = self.pool.lookup(hash_block(after, token_ids[matched:matched + length], self.cache_key))
                if block is not None:
                    return PrefixMatch(tuple(blocks), tuple(hashes), matched + length, block, length)
        return PrefixMatch(tuple(blocks), tuple(hashes), matched)

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one sequence's first lookup (the hit-rate metric)."""
        self.queried_tokens += queried_tokens
        self.hit_tokens += hit_tokens

    def cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.queried_tokens, self.hit_tokens, self.pool.evictions, self.pool.num_cached_free)

    def cached_hashes(self, limit: int) -> tuple[int, ...]:
        """Up to ``limit`` hashes of this manager's cached blocks, most recently used first (for routing)."""
        return self.pool.recent_hashes(limit) if self.enable_caching else ()

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Cache every full block of ``seq_id`` whose tokens are computed (``token_ids[:num_computed_tokens]``)."""
        if not self.enable_caching:
            return
        table = self._tables.get(seq_id)
        if table is None:
            return
        known = self._hashes.setdefault(seq_id, [])
        full = min(num_computed_tokens // self.block_size, len(table))
        if full <= len(known):
            return
        hashes = chain_hashes(token_ids, self.block_size, self.cache_key, full, start=known)
        for i in range(len(known), full):
            self.pool.register(table[i], hashes[i])
        known[:] = hashes

    def cache_tail(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> bool:
        """Cache ``seq_id``'s partly filled last block before the sequence is freed (a finished
        turn: the next turn of its conversation continues these tokens). Only a block this
        sequence alone holds and whose full predecessors are cached; ``True`` if it was named."""
        if not self.enable_caching:
            return False
        table = self._tables.get(seq_id)
        full, length = divmod(num_computed_tokens, self.block_size)
        known = self._hashes.get(seq_id, [])
        if not table or length == 0 or full >= len(table) or len(known) < full:
            return False
        block = table[full]
        if self.pool.refcount(block) != 1 or seq_id in self._cow:
            return False
        start = full * self.block_size
        name = hash_block(known[full - 1] if full else None, token_ids[start:start + length], self.cache_key)
        return self.pool.register(block, name, tail=True)

    # ----------------------------------------------------------- allocation
    def allocate_slots(self, seq_id: str, num_tokens: int, prefix: PrefixMatch | None = None) -> bool:
        """Grow ``seq_id``'s table to hold ``num_tokens`` tokens in total.

        ``prefix`` (a new sequence only): start the table with these cached
        blocks, shared, and allocate only the rest. All-or-nothing.
        """
        table = self._tables.get(seq_id)
        if prefix is not None and (prefix.blocks or prefix.tail_block is not None):
            if table:
                raise BlockPoolError(f"{seq_id!r} already holds blocks; a prefix starts a new table")
            taken = list(prefix.blocks) + ([prefix.tail_block] if prefix.tail_block is not None else [])
            missing = blocks_needed(num_tokens, self.block_size) - len(prefix.blocks)
            # Reviving a free cached block takes it out of the free count too.
            reviving = sum(1 for b in taken if self.pool.refcount(b) == 0)
            if missing + reviving > self.pool.num_free:
                return False
            self.pool.acquire(taken)
            new = self.pool.allocate(max(missing, 0))
            assert new is not None  # checked above
            if prefix.tail_block is not None:
                # The tail's tokens reach this sequence as a copy (it writes on after them); the
                # cached tail stays held, so not evicted, until the engine has taken the copy.
                assert new, "a tail match leaves at least one token to compute"
                self._copies.append((prefix.tail_block, new[0]))
                self._tail_sources[new[0]] = prefix.tail_block
            self._tables[seq_id] = list(prefix.blocks) + new
            self._hashes[seq_id] = list(prefix.hashes)
            return True
        table = self._tables.setdefault(seq_id, [])
        missing = max(blocks_needed(num_tokens, self.block_size) - len(table), 0)
        if missing + self._copy_cost(seq_id) > self.pool.num_free:
            if not table:
                del self._tables[seq_id]
            return False
        self._copy_on_write(seq_id)
        if missing:
            new = self.pool.allocate(missing)
            assert new is not None  # checked above
            table.extend(new)
        return True

    # --------------------------------------------------------------- forking
    def fork(self, parent_id: str, child_id: str, num_computed_tokens: int) -> None:
        """Give ``child_id`` every block of ``parent_id`` (one more reference each).

        The block holding position ``num_computed_tokens`` (the next one
        written), if the table has it, becomes copy-on-write for both. One
        of the parent's spare blocks, if it holds any, moves to the child.
        """
        if child_id in self._tables:
            raise BlockPoolError(f"{child_id!r} already holds blocks; a fork starts a new table")
        table = self._tables[parent_id]
        self.pool.incref(table)
        self._tables[child_id] = list(table)
        self._hashes[child_id] = list(self._hashes.get(parent_id, ()))
        idx = num_computed_tokens // self.block_size
        if idx < len(table):
            self._cow[parent_id] = self._cow[child_id] = idx
        spares = self._spares.get(parent_id)
        if spares:
            self._spares[child_id] = [spares.pop()]

    def rename(self, old: str, new: str) -> None:
        """Let ``new`` own what ``old`` holds (a group's reservation taken over by its first live sample)."""
        if new in self._tables:
            raise BlockPoolError(f"{new!r} already holds blocks")
        for d in (self._tables, self._hashes, self._cow, self._spares):
            if old in d:
                d[new] = d.pop(old)

    def hold_spares(self, seq_id: str, n: int) -> bool:
        """Hold ``n`` more blocks for the copies on write of ``seq_id``'s future forks; all or nothing."""
        blocks = self.pool.allocate(n)
        if blocks is None:
            return False
        self._spares.setdefault(seq_id, []).extend(blocks)
        return True

    def num_spares(self, seq_id: str) -> int:
        return len(self._spares.get(seq_id, ()))

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) block copies due before the next write; the caller does them now."""
        copies, self._copies = self._copies, []
        if self._tail_sources:  # the caller copies before anything allocates again: the tails may go
            self.pool.free(list(self._tail_sources.values()))
            self._tail_sources.clear()
        return copies

    def _copy_cost(self, seq_id: str) -> int:
        """Blocks the pool must give for ``seq_id``'s pending copy on write (0 or 1)."""
        idx = self._cow.get(seq_id)
        if idx is None or self.pool.refcount(self._tables[seq_id][idx]) <= 1 or self._spares.get(seq_id):
            return 0
        return 1

    def _copy_on_write(self, seq_id: str) -> None:
        """Before ``seq_id`` writes its copy-on-write block: take a block of its own if the block is
        still shared (a spare first), and queue the copy; the last sharer keeps the block."""
        idx = self._cow.pop(seq_id, None)
        if idx is None:
            return
        spares = self._spares.pop(seq_id, [])
        table = self._tables[seq_id]
        shared = table[idx]
        if self.pool.refcount(shared) > 1:
            fresh = spares.pop() if spares else self.pool.allocate(1)[0]  # type: ignore[index]
            self._copies.append((shared, fresh))
            table[idx] = fresh
            self.pool.free([shared])
        if spares:  # not needed (the block was no longer shared): back to the pool
            self.pool.free(spares)

    def free(self, seq_id: str) -> None:
        """Release every block of ``seq_id`` (a no-op if it holds none); cached ones stay cached."""
        self._hashes.pop(seq_id, None)
        self._cow.pop(seq_id, None)
        spares = self._spares.pop(seq_id, None)
        if spares:
            self.pool.free(spares)
        table = self._tables.pop(seq_id, None)
        if table:
            if self._copies:  # a copy into a block freed before the step ran is moot
                mine = set(table)
                self._copies = [c for c in self._copies if c[1] not in mine]
                moot = [self._tail_sources.pop(b) for b in table if b in self._tail_sources]
                if moot:
                    self.pool.free(moot)
            self.pool.free(table)

    def slot(self, seq_id: str, position: int) -> int:
        """Flat slot index (block * block_size + offset) of a token position."""
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
