"""Block pool and KV cache manager: plain Python, no torch."""

import pytest

from engine.kv_cache_manager import BlockPool, BlockPoolError, KVCacheManager, blocks_needed


def test_allocate_and_free_return_blocks_to_the_free_list():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert a is not None and len(set(a)) == 3
    assert pool.num_free == 1 and pool.num_used == 3
    pool.free(a)
    assert pool.num_free == 4


def test_allocation_is_all_or_nothing_on_exhaustion():
    pool = BlockPool(4)
    assert pool.allocate(3) is not None
    assert pool.allocate(2) is None
    assert pool.num_free == 1  # the failed call took nothing
    assert pool.allocate(1) is not None
    assert pool.allocate(1) is None


def test_refcounted_block_is_freed_only_by_its_last_owner():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.incref([b])
    assert pool.refcount(b) == 2
    pool.free([b])
    assert pool.num_free == 1 and pool.refcount(b) == 1
    pool.free([b])
    assert pool.num_free == 2 and pool.refcount(b) == 0


def test_double_free_and_foreign_blocks_are_refused():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(BlockPoolError, match="freed twice"):
        pool.free([b])
    with pytest.raises(BlockPoolError, match="not in this pool"):
        pool.free([7])
    with pytest.raises(BlockPoolError, match="is free"):
        pool.incref([b])


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError):
        BlockPool(0)
    with pytest.raises(ValueError):
        KVCacheManager(4, 0)


def test_blocks_needed_is_ceiling_division():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_manager_grows_tables_and_maps_slots():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots("a", 5)  # two blocks
    assert len(kv.block_table("a")) == 2
    assert kv.allocate_slots("a", 8)  # still two
    assert len(kv.block_table("a")) == 2
    t = kv.block_table("a")
    assert kv.slot("a", 0) == t[0] * 4
    assert kv.slot("a", 5) == t[1] * 4 + 1
    assert kv.allocate_slots("b", 8)
    assert kv.num_free_blocks == 0
    assert not kv.allocate_slots("c", 1)
    assert kv.block_table("c") == []  # a failed first allocation leaves no table
    assert not kv.allocate_slots("a", 9)
    assert len(kv.block_table("a")) == 2  # a failed growth keeps what it had
    kv.free("a")
    kv.free("b")
    kv.free("never-allocated")
    assert kv.num_free_blocks == 4


def test_core_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, engine.kv_cache_manager, engine.scheduler, engine.sequence, engine.sampling_params;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
