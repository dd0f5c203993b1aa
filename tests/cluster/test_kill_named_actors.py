"""``kill_named_actors`` re-sends a kill the GCS did not act on and returns once the namespace is empty.

Ray's calls are replaced by a small stand-in of the GCS's named-actor list (a unit test of the
teardown loop alone; the live teardown is exercised by tests/integration/test_pool_survival.py).
"""

from __future__ import annotations

import cluster.pool_manager as pm


class StandInGcs:
    """Named actors of one namespace; the first ``lost`` kills of each name are dropped."""

    def __init__(self, names: list[str], lost: int) -> None:
        self.alive = set(names)
        self.lost = {n: lost for n in names}
        self.kills: list[str] = []

    def list_named_actors(self, all_namespaces: bool) -> list[dict]:
        return [{"name": n, "namespace": "ns"} for n in sorted(self.alive)] + [{"name": "x", "namespace": "other"}]

    def get_actor(self, name: str, namespace: str) -> str:
        if name not in self.alive:
            raise ValueError(name)
        return name

    def kill(self, handle: str, no_restart: bool) -> None:
        self.kills.append(handle)
        if self.lost[handle] > 0:
            self.lost[handle] -= 1
        else:
            self.alive.discard(handle)


def patch(monkeypatch, gcs: StandInGcs) -> None:
    monkeypatch.setattr(pm.ray.util, "list_named_actors", gcs.list_named_actors)
    monkeypatch.setattr(pm.ray, "get_actor", gcs.get_actor)
    monkeypatch.setattr(pm.ray, "kill", gcs.kill)
    monkeypatch.setattr(pm, "KILL_RESEND_S", 0.05)


def test_a_lost_kill_is_sent_again_until_the_namespace_is_empty(monkeypatch):
    gcs = StandInGcs(["pool-manager", "decode-0", "prefill-0"], lost=2)
    patch(monkeypatch, gcs)
    assert pm.kill_named_actors("ns", timeout_s=10) == ["decode-0", "pool-manager", "prefill-0"]
    assert gcs.alive == set()
    assert sorted(set(gcs.kills)) == ["decode-0", "pool-manager", "prefill-0"] and len(gcs.kills) == 9


def test_an_actor_that_never_dies_is_given_up_after_the_timeout(monkeypatch):
    gcs = StandInGcs(["decode-0"], lost=10**6)
    patch(monkeypatch, gcs)
    assert pm.kill_named_actors("ns", timeout_s=0.3) == ["decode-0"]
    assert gcs.alive == {"decode-0"}  # reported by the caller (cluster.launch --teardown exits 1)


def test_an_empty_namespace_kills_nothing(monkeypatch):
    gcs = StandInGcs([], lost=0)
    patch(monkeypatch, gcs)
    assert pm.kill_named_actors("ns") == []
    assert gcs.kills == []
