"""What each worker's prefix cache holds, as the router last heard it.

Torch- and Ray-free. Every status poll brings a worker's
:class:`~worker_common.worker_status.PrefixCacheReport`: its block size, its
KV-compatibility key and up to ``MAX_PUBLISHED_HASHES`` chained block hashes,
most recently used first. The index keeps the latest digest per worker (so
it is bounded in size by that cap and in staleness by the poll interval) and
answers one question: how many leading tokens of this prompt would this
worker find cached? It computes the prompt's block hashes with the workers'
own function (:func:`engine.kv_cache_manager.chain_hashes`), once per
(block size, key) per request.

An estimate, never a promise: a block may have been evicted since the last
poll (the worker then computes or receives it), or cached since (the worker
finds it anyway). Routing only uses it to prefer workers; correctness never
depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_cache_manager import chain_hashes


@dataclass(frozen=True)
class _Digest:
    block_size: int
    cache_key: str
    hashes: frozenset[int]


@dataclass
class PrefixQuery:
    """One prompt's block hashes, computed lazily per (block size, key) and shared by every worker asked."""

    token_ids: list[int]
    _chains: dict[tuple[int, str], list[int]] = field(default_factory=dict)

    def chain(self, block_size: int, cache_key: str) -> list[int]:
        key = (block_size, cache_key)
        if key not in self._chains:
            # As the engine matches: at most len - 1 tokens (one is always computed).
            limit = max(len(self.token_ids) - 1, 0) // block_size
            self._chains[key] = chain_hashes(self.token_ids, block_size, cache_key, limit)
        return self._chains[key]


class PrefixIndex:
    """Latest published cache digest per worker; see the module docstring."""

    def __init__(self) -> None:
        self._digests: dict[str, _Digest] = {}

    def update(self, worker_id: str, enabled: bool, block_size: int, cache_key: str,
               block_hashes: tuple[int, ...]) -> None:
        """Replace ``worker_id``'s digest with the one its status just reported."""
        if not enabled or block_size < 1 or not block_hashes:
            self._digests.pop(worker_id, None)
            return
        old = self._digests.get(worker_id)
        hashes = frozenset(block_hashes)
        if old is None or old.hashes != hashes or old.block_size != block_size or old.cache_key != cache_key:
            self._digests[worker_id] = _Digest(block_size, cache_key, hashes)

    def forget(self, worker_id: str) -> None:
        self._digests.pop(worker_id, None)

    def cached_tokens(self, worker_id: str, query: PrefixQuery) -> int:
        """Leading tokens of ``query`` that ``worker_id`` reported cached (0 if unknown)."""
        d = self._digests.get(worker_id)
        if d is None:
            return 0
        n = 0
        for h in query.chain(d.block_size, d.cache_key):
            if h not in d.hashes:
                break
            n += 1
        return n * d.block_size
