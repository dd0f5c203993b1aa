"""Scheduler: plain Python, driven by hand as the engine would drive it."""

from engine.kv_cache_manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import JOIN_TOKENS, Scheduler
from engine.sequence import Sequence, SequenceStatus


def seq(rid: str, n_prompt: int, arrival: int = 0) -> Sequence:
    return Sequence(rid, list(range(n_prompt)), SamplingParams(max_tokens=100), arrival=arrival)


def run(sched: Scheduler, plan, next_token: int = 7) -> None:
    """Mimic the engine: mark chunks computed, append a token where one is due."""
    for c in plan.chunks:
        c.seq.num_computed_tokens = c.start + c.num_tokens
        if c.samples:
            c.seq.output_token_ids.append(next_token)


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    sched = Scheduler(KVCacheManager(64, 4), max_running=8, max_batched_tokens=10)
    s = seq("a", 25)
    sched.add(s)
    sizes = []
    while not s.output_token_ids:
        plan = sched.schedule()
        assert plan.num_tokens <= 10
        sizes.append([(c.start, c.num_tokens, c.samples) for c in plan.chunks])
        run(sched, plan)
    assert sizes == [[(0, 10, False)], [(10, 10, False)], [(20, 5, True)]]
    plan = sched.schedule()  # now decoding: one token
    assert [(c.start, c.num_tokens, c.samples) for c in plan.chunks] == [(25, 1, True)]


def test_decode_and_new_prefill_share_a_step():
    sched = Scheduler(KVCacheManager(64, 4), max_running=8, max_batched_tokens=16)
    a, b = seq("a", 4), seq("b", 6)
    sched.add(a)
    run(sched, sched.schedule())
    sched.add(b)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 6)]


def test_admission_respects_max_running():
    sched = Scheduler(KVCacheManager(64, 4), max_running=2, max_batched_tokens=100)
    for i in range(3):
        sched.add(seq(f"s{i}", 4, i))
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["s0", "s1"]
    assert [s.request_id for s in sched.waiting] == ["s2"]


def test_admission_waits_for_free_blocks():
    kv = KVCacheManager(4, 4)  # 16 tokens
    sched = Scheduler(kv, max_running=8, max_batched_tokens=100)
    sched.add(seq("a", 12))
    sched.add(seq("b", 8))
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["a"]
    assert [s.request_id for s in sched.waiting] == ["b"]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    kv = KVCacheManager(4, 2)  # 8 tokens in all
    sched = Scheduler(kv, max_running=8, max_batched_tokens=100)
    a, b = seq("a", 4, 0), seq("b", 4, 1)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())  # both prefilled: 4 blocks used, each has 5 tokens
    assert kv.num_free_blocks == 0
    plan = sched.schedule()  # a needs a 3rd block -> b is preempted
    assert [s.request_id for s in plan.preempted] == ["b"]
    assert [c.seq.request_id for c in plan.chunks] == ["a"]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [7]  # kept: recompute covers prompt + output
    assert list(sched.waiting) == [b]
    run(sched, plan)
    sched.remove(a)  # a finishes
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in plan.chunks] == [("b", 0, 5, True)]


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_newest():
    kv = KVCacheManager(3, 2)
    sched = Scheduler(kv, max_running=8, max_batched_tokens=100)
    a, b = seq("a", 2, 0), seq("b", 4, 1)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())  # a: 1 block, b: 2 blocks; both hold 1 more token
    plan = sched.schedule()
    # a needs a new block for position 2: b (newest) is preempted, a proceeds.
    assert [s.request_id for s in plan.preempted] == ["b"]
    assert [c.seq.request_id for c in plan.chunks] == ["a"]
    assert kv.num_free_blocks + len(kv.block_table("a")) == 3


def test_multiple_preemptions_keep_arrival_order_in_the_queue():
    kv = KVCacheManager(6, 1)
    sched = Scheduler(kv, max_running=8, max_batched_tokens=100)
    seqs = [seq(f"s{i}", 2, i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run(sched, sched.schedule())  # 6 blocks used
    seqs[0].output_token_ids.append(7)  # s0 needs 2 more slots than it has
    plan = sched.schedule()
    assert [s.request_id for s in plan.preempted] == ["s2", "s1"]
    assert [s.request_id for s in sched.waiting] == ["s1", "s2"]


def test_remove_frees_blocks_wherever_the_sequence_is():
    kv = KVCacheManager(8, 2)
    sched = Scheduler(kv, max_running=1, max_batched_tokens=100)
    a, b = seq("a", 4), seq("b", 4)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    sched.remove(b)  # waiting
    sched.remove(a)  # running
    assert kv.num_free_blocks == 8 and not sched.has_work()


def test_a_long_prompt_behind_a_short_one_leads_the_next_step_instead_of_holding_it():
    sched = Scheduler(KVCacheManager(512, 16), max_running=8, max_batched_tokens=2048)
    short, long_, short2 = seq("short", 32), seq("long", JOIN_TOKENS + 700), seq("short2", 40)
    for s in (short, long_, short2):
        sched.add(s)
    plan = sched.schedule()  # the short one alone: the long one would make it wait for its whole prefill
    assert [c.seq.request_id for c in plan.chunks] == ["short"]
    run(sched, plan)
    plan = sched.schedule()  # the long one leads (the queue's head always goes); the short one behind it joins
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("short", 1), ("long", JOIN_TOKENS + 700),
                                                                        ("short2", 40)]


def test_prompts_up_to_the_join_size_share_a_step():
    sched = Scheduler(KVCacheManager(512, 16), max_running=8, max_batched_tokens=2048)
    prompts = [seq("a", 10), seq("b", JOIN_TOKENS), seq("c", JOIN_TOKENS + 10), seq("d", 2 * JOIN_TOKENS + 40)]
    for s in prompts:
        sched.add(s)
    # a (10) lets b (<= JOIN_TOKENS) join; c (longer than JOIN_TOKENS, not than the 266 admitted) joins too;
    # d (552) is longer than the step's 532 tokens so far: next step.
    assert [c.seq.request_id for c in sched.schedule().chunks] == ["a", "b", "c"]
