"""``kill_named_actors`` re-sends a kill the GCS did not act on and returns once the namespace is empty.

Ray's calls are replaced by a small stand-in of the GCS's named-actor list (a unit test of the
teardown loop alone; the live teardown is exercised by tests/integration/test_pool_survival.py).
"""

from __future__ import annotations

import time

import cluster.pool_manager as pm


class StandInGcs:
    """Named actors of one namespace; the first ``lost`` kills of each name are dropped. A worker
    killed while the pool manager lives is replaced at once (as the live manager does); ``late``
    registers once, 0.3 s after the namespace was first seen empty (a creation the manager sent
    just before it died)."""

    def __init__(self, names: list[str], lost: int, late: str | None = None) -> None:
        self.alive = set(names)
        self.lost = {n: lost for n in [*names, late]}
        self.kills: list[str] = []
        self.late, self.first_empty = late, None

    def list_named_actors(self, all_namespaces: bool) -> list[dict]:
        if not self.alive and self.first_empty is None:
            self.first_empty = time.monotonic()
        if self.late and self.first_empty is not None and time.monotonic() > self.first_empty + 0.3:
            self.alive.add(self.late)
            self.late = None
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
            if pm.POOL_MANAGER_NAME in self.alive:
                self.alive.add(handle)  # the manager's replacement, under the same name


def patch(monkeypatch, gcs: StandInGcs) -> None:
    monkeypatch.setattr(pm.ray.util, "list_named_actors", gcs.list_named_actors)
    monkeypatch.setattr(pm.ray, "get_actor", gcs.get_actor)
    monkeypatch.setattr(pm.ray, "kill", gcs.kill)
    monkeypatch.setattr(pm, "KILL_RESEND_S", 0.05)
    monkeypatch.setattr(pm, "KILL_QUIET_S", 1.0)


def test_a_lost_kill_is_sent_again_until_the_namespace_is_empty(monkeypatch):
    gcs = StandInGcs([pm.POOL_MANAGER_NAME, "decode-0", "prefill-0"], lost=2)
    patch(monkeypatch, gcs)
    assert pm.kill_named_actors("ns", timeout_s=10) == ["decode-0", pm.POOL_MANAGER_NAME, "prefill-0"]
    assert gcs.alive == set()
    # The manager first, until it is gone (else it would replace each worker killed), then the rest.
    assert gcs.kills[:3] == [pm.POOL_MANAGER_NAME] * 3
    assert sorted(gcs.kills[3:]) == ["decode-0"] * 3 + ["prefill-0"] * 3


def test_a_worker_registered_after_the_namespace_emptied_is_killed_too(monkeypatch):
    gcs = StandInGcs([pm.POOL_MANAGER_NAME, "decode-0"], lost=0, late="prefill-1")
    patch(monkeypatch, gcs)
    assert pm.kill_named_actors("ns", timeout_s=10) == ["decode-0", pm.POOL_MANAGER_NAME, "prefill-1"]
    assert gcs.alive == set()


def test_without_the_quiet_window_the_late_worker_would_survive(monkeypatch):
    gcs = StandInGcs([pm.POOL_MANAGER_NAME, "decode-0"], lost=0, late="prefill-1")
    patch(monkeypatch, gcs)
    monkeypatch.setattr(pm, "KILL_QUIET_S", 0.0)
    pm.kill_named_actors("ns", timeout_s=10)
    time.sleep(0.5)
    assert pm.named_actors("ns") == ["prefill-1"]  # what the live teardown saw before the window existed


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
