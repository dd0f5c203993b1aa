"""Drive an :class:`~engine.llm_engine.LLMEngine` from asyncio code.

A background thread steps the engine whenever it has work (torch releases
the GIL inside the forward, so the event loop stays responsive); each
request's outputs reach its caller through an ``asyncio.Queue``. Every
other engine call (add, abort, reserve, export, import) runs on that same
thread, between steps: one thread of the process does all of the engine's
torch work. That is for speed, not only order: each thread that runs a
parallel torch op gets an OpenMP team of its own, and once a process has
more OpenMP threads than cores, libgomp stops spinning between parallel
regions and wakes its threads through the kernel instead (measured on 2
cores: a bf16 ``add`` of 112 x 576 took 11 us on one team, 54 us with a
second team alive; a 112-token prefill 134-154 ms vs 215 ms).

A step that parks a prompt's KV (``kv_ready``: a prefill worker's hand-off)
is followed by a short pause for the callers it woke: their export runs
before the next step, which may be a long prompt's prefill that the
hand-off would otherwise wait out (measured: a 32-token prompt's 1.5 MB
push took 3.5 s behind a 900-token prefill).

Knows nothing of Ray or gRPC: both worker kinds wrap one of these.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine, RequestOutput
from engine.sequence import sample_request_id

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_POLL_S = 0.05  # how often an engine with nothing to run looks again without being woken
HANDOFF_WAIT_S = 0.1  # after a step with kv_ready outputs, wait at most this long for their callers' calls


class EngineClosedError(RuntimeError):
    """The engine was closed before (or while) the call could run."""


class EngineStepError(RuntimeError):
    """The engine step failed; the requests of that step were aborted."""


class RequestFailedError(RuntimeError):
    """One request failed on its own (the engine's ``finish_reason == "error"``); its blocks are free."""


def _put_all(routed: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in routed:
        queue.put_nowait(item)


class AsyncEngine:
    """Owns the stepping thread of one engine.

    ``batch_wait_s``: when the engine wakes from idle, wait this long before
    the first step so that requests arriving together share a batch.
    """

    def __init__(self, engine: LLMEngine, batch_wait_s: float = 0.0, handoff_wait_s: float = HANDOFF_WAIT_S) -> None:
        self.engine = engine
        self.batch_wait_s = batch_wait_s
        self.handoff_wait_s = handoff_wait_s
        # Calls waiting for the step thread, in arrival order (deque appends and pops are atomic).
        self._calls: deque[tuple[Callable[[LLMEngine], Any], concurrent.futures.Future]] = deque()
        self._calls_done = 0  # engine calls completed (read and written by the step thread only)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0

    def _ensure_started(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
            self._thread.start()

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the step thread, between steps, and return its result.

        A call cancelled before the thread reaches it does not run (as with an
        executor); one already running completes. Raises
        :class:`EngineClosedError` once the engine is closed."""
        self._ensure_started()
        if self._stop.is_set():
            raise EngineClosedError("engine is closed")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.append((fn, done))
        self._wake.set()
        if self._stop.is_set():  # closed meanwhile: the step thread may be gone without seeing this call
            self._refuse_calls()
        return await asyncio.wrap_future(done)

    def _claim_calls(self) -> Iterator[tuple[Callable[[LLMEngine], Any], concurrent.futures.Future]]:
        """Take the queued calls in order, each marked running; skip those whose caller gave up."""
        while True:
            try:
                fn, done = self._calls.popleft()
            except IndexError:
                return
            if done.set_running_or_notify_cancel():
                yield fn, done

    def _run_calls(self) -> None:
        """Run every queued call (on the step thread)."""
        for fn, done in self._claim_calls():
            try:
                result = fn(self.engine)
            except BaseException as exc:  # noqa: BLE001 - the caller gets it, the step thread goes on
                done.set_exception(exc)
            else:
                done.set_result(result)
            self._calls_done += 1

    def _refuse_calls(self) -> None:
        """Fail every queued call with :class:`EngineClosedError` (after close)."""
        for _, done in self._claim_calls():
            done.set_exception(EngineClosedError("engine is closed"))

    async def stream(self, request_id: str, start: Callable[[LLMEngine], Any]) -> AsyncIterator[RequestOutput]:
        """Run ``start(engine)`` (which adds ``request_id``), then yield its outputs.

        The stream ends after an output that is ``finished`` or ``kv_ready``.
        If the consumer stops early (cancel, error), the request is aborted
        and its blocks freed.
        """
        async with aclosing(self.stream_group([request_id], start)) as outs:  # closed with this one, at once
            async for out in outs:
                yield out

    async def stream_group(self, request_ids: list[str],
                           start: Callable[[LLMEngine], Any]) -> AsyncIterator[RequestOutput]:
        """:meth:`stream` for the samples of one request (``add_request(..., n)``): the
        outputs of every id in ``request_ids``, in the order they come; the stream
        ends once each has finished or is ``kv_ready``. An abort of any of them
        (:meth:`abort`) or a sample the engine failed ends the whole group: the
        samples still running are aborted, as on an early stop of the consumer."""
        self._ensure_started()
        queue: asyncio.Queue = asyncio.Queue()
        for rid in request_ids:
            self._queues[rid] = queue
        open_ids = set(request_ids)
        try:
            accepted = await self.call(start)
            if accepted is False:
                raise RuntimeError(f"engine had no room for {request_ids[0]}")
            while open_ids:
                item = await queue.get()
                if isinstance(item, Exception):
                    open_ids.clear()  # the failed step aborted every request in the engine
                    raise item
                if item.finish_reason == "error":
                    open_ids.discard(item.request_id)  # the engine already dropped it and freed its blocks
                    raise RequestFailedError(item.error or "request failed")
                if item.finish_reason == "abort":
                    # abort()'s sentinel: it may have raced ahead of ``start``,
                    # so the finally drops the request (and the rest of its group).
                    yield item
                    return
                yield item
                if item.finished or item.kv_ready:
                    open_ids.discard(item.request_id)
        finally:
            for rid in request_ids:
                self._queues.pop(rid, None)
            if open_ids:
                left = list(open_ids)
                await asyncio.shield(self.call(lambda e: [e.abort_request(r) for r in left]))

    async def abort(self, request_id: str, n: int = 1) -> bool:
        """Abort ``request_id`` (and the other ``n - 1`` samples of its request) wherever
        it is and end its stream (if one is open) with a finished ``"abort"`` output,
        so no caller waits on it forever."""
        ids = [sample_request_id(request_id, i) for i in range(n)]
        found = await self.call(lambda e: [e.abort_request(r) for r in ids])
        for rid in ids:
            self._deliver(rid, RequestOutput(rid, [], "", finished=True, finish_reason="abort"))
        return any(found)

    def _run(self) -> None:
        try:
            self._step_loop()
        finally:
            self._refuse_calls()

    def _step_loop(self) -> None:
        idle = True
        while not self._stop.is_set():
            self._run_calls()
            if not self.engine.scheduler.has_work():
                idle = self._sleep_until_woken()
                continue
            if idle and self.batch_wait_s > 0:
                time.sleep(self.batch_wait_s)  # let concurrent arrivals join this batch
                self._run_calls()
            idle = False
            try:
                steps_before = self.engine.num_steps
                outputs = self.engine.step()
                ran = self.engine.num_steps != steps_before
                self.steps += 1
            except Exception as exc:  # never let one bad step kill the loop
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            if not ran:
                # Requests wait but none could be scheduled (no free block): sleep
                # until something changes (a call: new request, abort, release)
                # instead of spinning a core on empty schedules.
                idle = self._sleep_until_woken()
                continue
            calls_before = self._calls_done
            self._deliver_step(outputs)
            handoffs = sum(1 for out in outputs if out.kv_ready)
            if handoffs:
                self._wait_for_calls(calls_before + handoffs)

    def _wait_for_calls(self, count: int) -> None:
        """Let the callers of this step's parked KVs export them before the next step (at most
        ``handoff_wait_s``): run calls as they arrive until ``count`` have completed."""
        deadline = time.monotonic() + self.handoff_wait_s
        while self._calls_done < count and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(timeout=left)
            self._wake.clear()
            self._run_calls()

    def _sleep_until_woken(self) -> bool:
        """Wait for a call (or ``IDLE_POLL_S``); the loop is idle after it. Calls queued
        before the clear are not lost: the loop runs the queue next."""
        self._wake.wait(timeout=IDLE_POLL_S)
        self._wake.clear()
        return True

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their streams in one hand-over to the event loop (one wake-up,
        not one per running request)."""
        self._deliver_all([(out.request_id, out) for out in outputs])

    def _deliver(self, request_id: str, item: Any) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, Any]]) -> None:
        """Each item to its request's stream, if one is open, in one call on the event loop."""
        routed = [(queue, item) for rid, item in items if (queue := self._queues.get(rid)) is not None]
        if routed and self._loop is not None:
            self._loop.call_soon_threadsafe(_put_all, routed)

    def _fail_all(self, exc: Exception) -> None:
        ids = [s.request_id for s in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting)]
        for rid in ids:
            self.engine.abort_request(rid)
        for rid in ids:
            self._deliver(rid, EngineStepError(f"engine step failed: {exc!r}"))

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._thread is None or not self._thread.is_alive():
            self._refuse_calls()  # no step thread will run them
