"""Lease reaping (WorkerBase._reap) on its own event loop, without a model."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from worker_common import worker_base
from worker_common.worker_base import WorkerBase


def test_an_expiry_that_raises_does_not_stop_later_ones(monkeypatch, caplog):
    monkeypatch.setattr(worker_base, "REAP_INTERVAL_S", 0.01)
    owner = SimpleNamespace(worker_id="decode-9", _reapers=[])
    expired: list[str] = []

    async def on_expire(key: str) -> None:
        expired.append(key)
        if key == "bad":
            raise RuntimeError("the transport is gone")

    async def go() -> None:
        past = time.monotonic() - 1
        deadlines = {"bad": past}
        WorkerBase._reap(owner, deadlines, on_expire)
        await asyncio.sleep(0.1)
        deadlines["good"] = time.monotonic() - 1  # a later lease, after the failure
        deadlines["later"] = time.monotonic() + 0.05
        await asyncio.sleep(0.3)
        for task in owner._reapers:
            task.cancel()

    asyncio.run(go())
    assert expired == ["bad", "good", "later"]
    assert "expiring the lease of bad failed" in caplog.text
