"""Colocated mode (``pools.mode: colocated``): every replica runs both phases
of its requests, as a single engine does. The same cluster code serves it;
output is exact and no KV moves."""

from __future__ import annotations

from router.client import Client
from tests.integration.clusters import assert_exact, generate_many, make_config, running, word_prompts


def test_colocated_replicas_serve_exactly_without_moving_kv(ray_head, tiny_model):
    texts = word_prompts(8, seed=51)
    with running(make_config(mode="colocated", replicas=2)) as (_, address):
        outs = generate_many(address, [dict(prompt=t, max_tokens=10, ignore_eos=True) for t in texts])
        status = Client(address).status()
    assert_exact(tiny_model, texts, outs, 10)
    assert [p.kind for p in status.pools] == ["colocated"]
    assert sorted(w.worker_id for w in status.pools[0].workers) == ["colocated-0", "colocated-1"]
    assert all(w.requests_served > 0 for w in status.pools[0].workers)
    for o in outs:
        t = o.timings
        assert t.prefill_worker == t.decode_worker and t.transfer_bytes == 0 and t.attempts == 1
        assert 0 < t.timeline.prefill_start_ms <= t.timeline.prefill_end_ms <= t.timeline.first_token_ms
