"""The prefix cache's bookkeeping: chained block hashes, LRU eviction among
unreferenced blocks, reference counts of shared blocks. Plain Python, no torch."""

import pytest

from engine.kv_cache_manager import BlockPool, BlockPoolError, KVCacheManager, chain_hashes, hash_block
from engine.scheduler import Scheduler
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4


def cached_manager(num_blocks: int = 8, key: str = "m|f32") -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, enable_caching=True, cache_key=key)


def fill(kv: KVCacheManager, seq_id: str, tokens: list[int]) -> int:
    """Admit ``tokens`` as a new sequence the way the scheduler does: cached prefix, then compute the rest."""
    prefix = kv.match_prefix(tokens)
    assert kv.allocate_slots(seq_id, len(tokens), prefix)
    kv.commit(seq_id, tokens, len(tokens))
    return prefix.num_tokens


def test_hash_chains_on_parent_tokens_and_key():
    a = hash_block(None, [1, 2, 3, 4], "k")
    assert a == hash_block(None, [1, 2, 3, 4], "k")  # deterministic (the router recomputes it)
    assert a != hash_block(None, [1, 2, 3, 5], "k")
    assert a != hash_block(None, [1, 2, 3, 4], "other-format")
    b = hash_block(a, [5, 6, 7, 8], "k")
    assert b != hash_block(None, [5, 6, 7, 8], "k")  # same tokens, another prefix
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS, "k") == [a, b]  # full blocks only
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, "k", max_blocks=1) == [a]
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, "k", start=[a]) == [a, b]


def test_a_second_sequence_reuses_the_leading_full_blocks_and_leaves_the_last_token():
    kv = cached_manager()
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    assert fill(kv, "a", tokens) == 0
    a_table = kv.block_table("a")
    assert fill(kv, "b", tokens) == 8
    assert kv.block_table("b")[:2] == a_table[:2] and kv.block_table("b")[2] != a_table[2]
    assert kv.pool.refcount(a_table[0]) == 2
    # A prompt that is exactly two blocks: the second block holds its last token, which must be computed.
    assert kv.match_prefix(list(range(8))).num_tokens == 4
    # A diverging block stops the match there, even if a later block's tokens are cached.
    assert kv.match_prefix([0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10]).num_tokens == 4
    assert cached_manager(key="another").match_prefix(tokens).num_tokens == 0


def test_freed_blocks_stay_cached_count_as_free_and_are_evicted_lru():
    kv = cached_manager(num_blocks=4)
    fill(kv, "a", [1] * 4 + [2] * 4)  # 2 full blocks
    fill(kv, "b", [3] * 4 + [4])  # 1 full block + 1 partial
    kv.free("a")
    kv.free("b")
    stats = kv.cache_stats()
    assert kv.num_free_blocks == 4 and stats.cached_blocks == 3 and stats.evictions == 0
    # A fresh block comes from the never-hashed one first, then the least recently freed cached one:
    # "a" was freed first, tail before head, so a's second block goes before its first.
    assert kv.allocate_slots("c", 2 * BS)
    assert kv.cache_stats().evictions == 1
    assert kv.match_prefix([1] * 4 + [2] * 4 + [0]).num_tokens == 4  # a's first block survived
    assert kv.match_prefix([3] * 4 + [0]).num_tokens == 4


def test_reviving_a_cached_block_takes_it_out_of_the_free_count_all_or_nothing():
    kv = cached_manager(num_blocks=3)
    fill(kv, "a", [1] * 8 + [0])
    kv.free("a")
    assert kv.num_free_blocks == 3
    prefix = kv.match_prefix([1] * 8 + [5] * 8)
    assert prefix.num_tokens == 8
    # Needs the 2 cached blocks plus 2 fresh ones: 4 > 3, so nothing is taken.
    assert not kv.allocate_slots("b", 16, prefix)
    assert kv.num_free_blocks == 3 and kv.block_table("b") == []
    assert kv.allocate_slots("b", 12, prefix) and kv.num_free_blocks == 0
    assert kv.cache_stats().evictions == 0  # the fresh block is a's partial one, never hashed


def test_shared_blocks_survive_any_one_owner_leaving():
    kv = cached_manager()
    tokens = list(range(9))
    fill(kv, "a", tokens)
    fill(kv, "b", tokens)
    shared = kv.block_table("b")[:2]
    kv.free("a")  # cancel / abort / preempt of one sharer
    assert all(kv.pool.refcount(b) == 1 for b in shared)
    assert kv.num_free_blocks == 5
    assert kv.allocate_slots("c", 5 * BS)  # every free block, yet none that "b" still reads
    assert not set(shared) & set(kv.block_table("c"))
    assert kv.match_prefix(tokens).blocks == tuple(shared)
    kv.free("c")
    kv.free("b")
    assert kv.num_free_blocks == kv.num_blocks
    with pytest.raises(BlockPoolError):
        kv.pool.free([shared[0]])


def test_a_duplicate_block_keeps_the_first_copy_cached():
    kv = cached_manager()
    tokens = [7] * 8 + [1]
    assert kv.allocate_slots("a", 9) and kv.allocate_slots("b", 9)  # both computed it, no sharing
    kv.commit("a", tokens, 9)
    kv.commit("b", tokens, 9)
    assert kv.pool.num_hashed == 2  # a's two blocks; b's copies stay plain
    kv.free("b")
    kv.free("a")
    assert kv.cache_stats().cached_blocks == 2 and kv.num_free_blocks == kv.num_blocks


def test_recent_hashes_are_bounded_and_most_recent_first():
    kv = cached_manager(num_blocks=8)
    fill(kv, "a", [1] * 4 + [0])
    fill(kv, "b", [2] * 4 + [0])
    hb = hash_block(None, [2] * 4, kv.cache_key)
    ha = hash_block(None, [1] * 4, kv.cache_key)
    assert kv.cached_hashes(10) == (hb, ha)
    assert kv.cached_hashes(1) == (hb,)
    fill(kv, "c", [1] * 4 + [0])  # a hit touches a's block
    assert kv.cached_hashes(1) == (ha,)
    assert KVCacheManager(8, BS).cached_hashes(10) == ()  # caching off: nothing published


def test_caching_off_shares_nothing():
    kv = KVCacheManager(8, BS)
    tokens = list(range(9))
    fill(kv, "a", tokens)
    assert fill(kv, "b", tokens) == 0 and kv.pool.num_hashed == 0
    kv.free("a")
    kv.free("b")
    assert kv.cache_stats().cached_blocks == 0


def test_pool_refuses_acquiring_or_registering_what_it_cannot():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    with pytest.raises(BlockPoolError):
        pool.acquire([b])  # not cached
    assert pool.register(b, 42) and not pool.register(b, 43)
    pool.free([b])
    with pytest.raises(BlockPoolError):
        pool.register(b, 44)  # free blocks are not named


def test_scheduler_admits_after_the_cached_prefix_and_counts_the_hit_once():
    kv = cached_manager(num_blocks=16)
    sched = Scheduler(kv, max_running=4, max_batched_tokens=64)
    params = SamplingParams(max_tokens=4)
    first = Sequence("a", list(range(13)), params)
    sched.add(first)
    (chunk,) = sched.schedule().chunks
    assert (chunk.start, chunk.num_tokens) == (0, 13)
    first.num_computed_tokens = 13
    kv.commit("a", first.token_ids, 13)
    sched.remove(first)
    second = Sequence("b", list(range(13)) + [99, 98], params)
    sched.add(second)
    (chunk,) = sched.schedule().chunks
    assert (chunk.start, chunk.num_tokens) == (12, 3)  # three full blocks cached
    assert second.num_cached_tokens == 12
    assert (kv.queried_tokens, kv.hit_tokens) == (13 + 15, 12)
    # Preempted and readmitted: it finds its own blocks again, but the hit rate counts it once.
    second.num_computed_tokens = 15
    kv.commit("b", second.token_ids, 15)
    sched._preempt(sched.running.pop())
    (chunk,) = sched.schedule().chunks
    assert chunk.start == 12 and (kv.queried_tokens, kv.hit_tokens) == (28, 12)


# ------------------------------------------------------------------ tails
def finish(kv: KVCacheManager, seq_id: str, tokens: list[int]) -> None:
    """End a computed sequence as the engine does: its tail cached, then its blocks freed."""
    kv.cache_tail(seq_id, tokens, len(tokens))
    kv.free(seq_id)


def test_a_finished_turns_tail_is_matched_by_the_next_turn_and_copied_not_shared():
    kv = cached_manager()
    turn1 = list(range(10))  # 2 full blocks + a tail of 2 tokens
    fill(kv, "t1", turn1)
    tail = kv.block_table("t1")[2]
    finish(kv, "t1", turn1)
    assert kv.num_free_blocks == kv.num_blocks and kv.cache_stats().cached_blocks == 3
    turn2 = turn1 + [50, 51, 52, 53, 54]  # continues the history, then its new message
    assert kv.match_prefix(turn2).num_tokens == 8  # full blocks only, unless asked
    prefix = kv.match_prefix(turn2, tails=True)
    assert (prefix.num_tokens, prefix.tail_block, prefix.tail_tokens) == (10, tail, 2)
    assert kv.allocate_slots("t2", len(turn2), prefix)
    table = kv.block_table("t2")
    assert table[2] != tail and kv.pool.refcount(tail) == 1  # a fresh block; the tail held until copied
    assert kv.take_copies() == [(tail, table[2])]
    assert kv.pool.refcount(tail) == 0 and kv.take_copies() == []  # released once taken; still cached
    assert kv.match_prefix(turn1 + [99], tails=True).tail_block == tail
    kv.commit("t2", turn2, len(turn2))
    finish(kv, "t2", turn2)
    assert kv.num_free_blocks == kv.num_blocks
    # Turn 3 finds turn 2's blocks, the one that was a copy now full and cached under its own name.
    assert kv.match_prefix(turn2 + [7, 7], tails=True).num_tokens == 15


def test_a_tail_matches_only_as_far_as_its_tokens_and_never_past_the_last_token():
    kv = cached_manager()
    fill(kv, "a", [1, 2, 3, 4, 5, 6, 7])  # a tail of 3 tokens: 5 6 7
    finish(kv, "a", [1, 2, 3, 4, 5, 6, 7])
    assert kv.match_prefix([1, 2, 3, 4, 5, 6, 9, 9], tails=True).num_tokens == 4  # diverges inside the tail
    assert kv.match_prefix([1, 2, 3, 4, 5, 6, 7, 8], tails=True).num_tokens == 7
    assert kv.match_prefix([1, 2, 3, 4, 5, 6, 7], tails=True).num_tokens == 4  # the last token is computed
    fill(kv, "b", [5, 6])  # a tail with no full block before it
    finish(kv, "b", [5, 6])
    assert kv.match_prefix([5, 6, 0], tails=True).num_tokens == 2


def test_tails_are_not_routed_on_and_a_shared_or_empty_tail_is_not_cached():
    kv = cached_manager()
    fill(kv, "a", list(range(6)))
    finish(kv, "a", list(range(6)))
    assert kv.cached_hashes(10) == (hash_block(None, [0, 1, 2, 3], kv.cache_key),)  # the full block only
    fill(kv, "b", list(range(8)))  # no tail: ends on a block boundary
    assert not kv.cache_tail("b", list(range(8)), 8)
    kv.fork("b", "b2", 7)  # the last block shared copy-on-write
    assert not kv.cache_tail("b", list(range(8)), 7)
    kv.free("b")
    kv.free("b2")
    assert kv.num_free_blocks == kv.num_blocks
    assert not cached_manager().cache_tail("nobody", [1], 1)


def test_a_tail_copy_dropped_before_the_step_releases_its_source_and_leaks_nothing():
    kv = cached_manager(num_blocks=4)
    fill(kv, "a", [1, 2, 3, 4, 5, 6])
    finish(kv, "a", [1, 2, 3, 4, 5, 6])
    prefix = kv.match_prefix([1, 2, 3, 4, 5, 6, 7], tails=True)
    assert kv.allocate_slots("b", 7, prefix)
    kv.free("b")  # aborted before the engine took the copy
    assert kv.take_copies() == []
    assert kv.num_free_blocks == 4 and kv.match_prefix([1, 2, 3, 4, 5, 6, 7], tails=True).num_tokens == 6
    # Room is counted with the tail revived: 2 full + tail + ... all or nothing.
    assert kv.allocate_slots("x", 2 * BS)  # takes the 2 never-hashed blocks
    prefix = kv.match_prefix([1, 2, 3, 4, 5, 6, 7], tails=True)
    assert not kv.allocate_slots("c", 7, prefix)  # 1 revived block + tail + 1 fresh > 2 free
    assert kv.num_free_blocks == 2


def test_scheduler_admits_after_a_cached_tail():
    kv = cached_manager()
    fill(kv, "a", list(range(6)))
    finish(kv, "a", list(range(6)))
    sched = Scheduler(kv, max_running=4, max_batched_tokens=64)
    seq = Sequence("b", list(range(6)) + [9, 9], SamplingParams(max_tokens=1))
    sched.add(seq)
    out = sched.schedule()
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(6, 2)]
    assert seq.num_cached_tokens == 6 and kv.cache_stats().hit_tokens == 6
    assert len(kv.take_copies()) == 1
