"""Drive an :class:`~engine.llm_engine.LLMEngine` from asyncio code.

A background thread steps the engine whenever it has work (torch releases
the GIL inside the forward, so the event loop stays responsive); each
request's outputs reach its caller through an ``asyncio.Queue``. Every
other engine call runs under the same lock, off the event loop.

Knows nothing of Ray or gRPC: both worker kinds wrap one of these.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from engine.llm_engine import LLMEngine, RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_POLL_S = 0.05  # how often an engine with nothing to run looks again without being woken


class EngineStepError(RuntimeError):
    """The engine step failed; the requests of that step were aborted."""


class RequestFailedError(RuntimeError):
    """One request failed on its own (the engine's ``finish_reason == "error"``); its blocks are free."""


class AsyncEngine:
    """Owns the stepping thread of one engine.

    ``batch_wait_s``: when the engine wakes from idle, wait this long before
    the first step so that requests arriving together share a batch.
    """

    def __init__(self, engine: LLMEngine, batch_wait_s: float = 0.0) -> None:
        self.engine = engine
        self.batch_wait_s = batch_wait_s
        self._lock = threading.Lock()
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
        """Run ``fn(engine)`` under the engine lock, off the event loop."""
        self._ensure_started()

        def locked() -> T:
            with self._lock:
                return fn(self.engine)

        result = await asyncio.to_thread(locked)
        self._wake.set()
        return result

    async def stream(self, request_id: str, start: Callable[[LLMEngine], Any]) -> AsyncIterator[RequestOutput]:
        """Run ``start(engine)`` (which adds ``request_id``), then yield its outputs.

        The stream ends after an output that is ``finished`` or ``kv_ready``.
        If the consumer stops early (cancel, error), the request is aborted
        and its blocks freed.
        """
        self._ensure_started()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        done = False
        try:
            accepted = await self.call(start)
            if accepted is False:
                raise RuntimeError(f"engine had no room for {request_id}")
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                if item.finish_reason == "error":
                    done = True  # the engine already dropped it and freed its blocks
                    raise RequestFailedError(item.error or "request failed")
                if item.finish_reason == "abort":
                    # abort()'s sentinel: it may have raced ahead of ``start``,
                    # so leave ``done`` False and let the finally drop the request.
                    yield item
                    return
                yield item
                if item.finished or item.kv_ready:
                    done = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not done:
                await asyncio.shield(self.call(lambda e: e.abort_request(request_id)))

    async def abort(self, request_id: str) -> bool:
        """Abort ``request_id`` wherever it is and end its stream (if one is open)
        with a finished ``"abort"`` output, so no caller waits on it forever."""
        found = await self.call(lambda e: e.abort_request(request_id))
        self._deliver(request_id, RequestOutput(request_id, [], "", finished=True, finish_reason="abort"))
        return found

    def _run(self) -> None:
        idle = True
        while not self._stop.is_set():
            with self._lock:
                has_work = self.engine.scheduler.has_work()
            if not has_work:
                idle = self._sleep_until_woken()
                continue
            if idle and self.batch_wait_s > 0:
                time.sleep(self.batch_wait_s)  # let concurrent arrivals join this batch
            idle = False
            try:
                with self._lock:
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
            for out in outputs:
                self._deliver(out.request_id, out)

    def _sleep_until_woken(self) -> bool:
        """Wait for a call to change the engine's state (or ``IDLE_POLL_S``); the loop is idle after it."""
        self._wake.wait(timeout=IDLE_POLL_S)
        self._wake.clear()
        return True

    def _deliver(self, request_id: str, item: Any) -> None:
        queue = self._queues.get(request_id)
        if queue is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
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
