"""The router's view of its workers' WorkerStatus: the directory's poll (alive
or not, last status kept), the routing load, and ClusterStatus built from it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from router.directory import WorkerDirectory, WorkerInfo
from router.server import ServingServicer
from router.validation import ModelLimits
from tests.observability.test_metrics import full_status
from worker_common.worker_status import WorkerStatus


class _Remote:
    """A stand-in for ``handle.status``: ``remote()`` answers with the next reply (an exception is raised)."""

    def __init__(self, replies: list) -> None:
        self.replies = replies

    def remote(self):
        reply = self.replies.pop(0)

        async def answer() -> WorkerStatus:
            if isinstance(reply, Exception):
                raise reply
            return reply

        return answer()


class _Handle:
    def __init__(self, *replies) -> None:
        self.status = _Remote(list(replies))


class _Runner:
    colocated = False


def _directory(*workers: WorkerInfo) -> WorkerDirectory:
    d = WorkerDirectory(pool_manager=None)
    d.workers = {w.worker_id: w for w in workers}
    d.targets = {"prefill": 1, "decode": 2}
    return d


def test_poll_keeps_the_last_status_of_a_worker_that_stops_answering():
    decode = replace(full_status("decode-0", "decode"), tokens_generated=55)
    w = WorkerInfo("decode-0", "decode", _Handle(decode, RuntimeError("dead")), {}, "node-a")
    d = _directory(w)
    assert (w.status, w.alive) == (None, False)
    assert (w.load().free_blocks, w.load().num_blocks) == (0, 1)  # never polled: no room claimed
    asyncio.run(d.poll_status())
    assert w.alive and w.status == decode
    assert (w.load().free_blocks, w.load().num_blocks) == (90, 100)
    asyncio.run(d.poll_status())
    assert not w.alive and w.status == decode


def test_cluster_status_reports_each_kind_from_its_worker_status():
    prefill = replace(full_status("prefill-0", "prefill"), tokens_prefilled=300, outstanding_tokens=-2)
    decode = replace(full_status("decode-0", "decode"), tokens_generated=55)
    d = _directory(
        WorkerInfo("prefill-0", "prefill", _Handle(prefill), {}, "node-a"),
        WorkerInfo("decode-0", "decode", _Handle(decode), {}, "node-b"),
        WorkerInfo("decode-1", "decode", _Handle(RuntimeError("not up yet")), {}, "node-b"),
    )
    servicer = ServingServicer(_Runner(), d, tokenizer=None, limits=ModelLimits("tiny", 64, 100), max_queued=1)
    resp = asyncio.run(servicer.ClusterStatus(None, None))
    assert resp.model == "tiny"
    pools = {p.kind: p for p in resp.pools}
    assert pools["prefill"].target_replicas == 1 and pools["decode"].target_replicas == 2
    (p0,) = pools["prefill"].workers
    assert (p0.worker_id, p0.node_id, p0.alive) == ("prefill-0", "node-a", True)
    assert (p0.running, p0.waiting, p0.free_blocks, p0.used_blocks, p0.num_blocks) == (3, 2, 90, 10, 100)
    assert p0.outstanding_tokens == 0  # a transiently negative count is clamped
    assert p0.requests_served == 7 and p0.tokens_generated == 300  # a prefill worker reports tokens prefilled
    d0, d1 = pools["decode"].workers
    assert d0.alive and d0.tokens_generated == 55 and d0.outstanding_tokens == 40
    # Never answered: listed, not alive, every figure 0.
    assert (d1.worker_id, d1.alive, d1.running, d1.num_blocks, d1.tokens_generated) == ("decode-1", False, 0, 0, 0)


def test_busy_counts_every_kind_of_pending_work():
    idle = replace(full_status("p", "prefill"), running=0, waiting=0, reserved=0, held=0, outstanding_tokens=0)
    assert not idle.busy
    for field in ("running", "waiting", "reserved", "held", "outstanding_tokens"):
        assert replace(idle, **{field: 1}).busy, field
