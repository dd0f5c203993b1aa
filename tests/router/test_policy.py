"""Routing policies: plain Python."""

import pytest

from router.policy import LeastLoaded, RoundRobin, WorkerLoad, make_policy


def test_round_robin_rotates():
    rr = RoundRobin()
    ws = [WorkerLoad("b"), WorkerLoad("a"), WorkerLoad("c")]
    assert [rr.rank(ws)[0] for _ in range(4)] == ["a", "b", "c", "a"]
    assert rr.rank([]) == []


def test_least_loaded_prefers_fewest_outstanding_then_most_free():
    ll = LeastLoaded()
    ws = [WorkerLoad("a", 100, 10, 100), WorkerLoad("b", 5, 1, 100), WorkerLoad("c", 5, 50, 100)]
    assert ll.rank(ws) == ["c", "b", "a"]


def test_unknown_policy_is_refused():
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    with pytest.raises(ValueError, match="router.policy"):
        make_policy("random")
