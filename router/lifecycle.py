"""One request's path through the cluster (DESIGN.md section 2).

1. Pick a pair: the policy ranks prefill and decode workers.
2. Reserve: the first decode worker in rank order that has room reserves
   blocks for the prompt under a lease; with no room anywhere the request
   waits (bounded by ``queue_timeout_s``), then is refused as exhausted.
3. Prefill: the prefill worker batches, prefills, pushes the KV to the
   reservation and returns the first token, which streams to the client.
4. Decode: the decode worker's stream acknowledges the KV (the prefill
   worker then frees its copy) and yields tokens until the request ends.
5. Any exit — finish, error, client cancel — tells both workers to drop the
   request, so their blocks are freed within one call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import ray

from router.directory import WorkerDirectory, WorkerInfo
from router.policy import RoutingPolicy
from router.validation import ParsedRequest

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 30.0


class NoCapacityError(RuntimeError):
    """No decode worker could reserve blocks in time (RESOURCE_EXHAUSTED)."""


class WorkerFailedError(RuntimeError):
    """A worker or a KV transfer failed for this request (UNAVAILABLE)."""


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class RequestTimings:
    received: float = field(default_factory=time.perf_counter)
    reserved: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0
    transfer_bytes: int = 0
    prefill_worker: str = ""
    decode_worker: str = ""
    num_output_tokens: int = 0


class RequestRunner:
    """Runs requests through the pools; shared by all of the router's RPCs."""

    def __init__(self, directory: WorkerDirectory, prefill_policy: RoutingPolicy, decode_policy: RoutingPolicy,
                 *, transfer_timeout_s: float = 30.0, queue_timeout_s: float = 30.0) -> None:
        self.directory = directory
        self.prefill_policy = prefill_policy
        self.decode_policy = decode_policy
        self.transfer_timeout_s = transfer_timeout_s
        self.queue_timeout_s = queue_timeout_s

    async def run(self, req: ParsedRequest, timings: RequestTimings) -> AsyncIterator[TokenEvent]:
        transfer_id = f"{req.request_id}-{uuid.uuid4().hex[:8]}"
        n_prompt = len(req.prompt_token_ids)
        prefill, decode = await self._reserve(transfer_id, n_prompt, timings)
        timings.prefill_worker, timings.decode_worker = prefill.worker_id, decode.worker_id
        prefill.inflight_tokens += n_prompt
        decode.inflight_tokens += req.params.max_tokens
        stream = None
        finished = False
        try:
            try:
                first = await asyncio.wait_for(
                    prefill.handle.prefill.remote(transfer_id, req.prompt_token_ids, req.params, decode.endpoint,
                                                  self.transfer_timeout_s),
                    timeout=CALL_TIMEOUT_S + self.transfer_timeout_s)
            finally:
                prefill.inflight_tokens -= n_prompt
            if "error" in first:
                raise WorkerFailedError(f"{prefill.worker_id}: {first['error']}")
            timings.prefill_ms, timings.transfer_ms = first["prefill_ms"], first["transfer_ms"]
            timings.transfer_bytes = first["transfer_bytes"]
            timings.first_token = time.perf_counter()
            timings.num_output_tokens = len(first["token_ids"])
            finished = first["finished"]
            yield TokenEvent(first["token_ids"], first["text"], finished, first["finish_reason"])
            if finished:
                return
            stream = decode.handle.generate.remote(transfer_id, first, req.params, self.transfer_timeout_s)
            async for ref in stream:
                ev = await ref
                if "error" in ev:
                    raise WorkerFailedError(f"{decode.worker_id}: {ev['error']}")
                if ev.get("ack"):
                    prefill.handle.release.remote(transfer_id)  # fire and forget: the hold has a lease anyway
                    continue
                timings.num_output_tokens += len(ev["token_ids"])
                finished = ev["finished"]
                yield TokenEvent(ev["token_ids"], ev["text"], finished, ev["finish_reason"])
                if finished:
                    return
        finally:
            decode.inflight_tokens -= req.params.max_tokens
            timings.finished = time.perf_counter()
            if not finished:
                # Cancelled or failed: drop the request on both sides, without
                # waiting (the handler may be cancelled itself).
                if stream is not None:
                    ray.cancel(stream)
                prefill.handle.abort.remote(transfer_id)
                decode.handle.abort.remote(transfer_id)

    async def _reserve(self, transfer_id: str, n_prompt: int, timings: RequestTimings) -> tuple[WorkerInfo, WorkerInfo]:
        deadline = time.monotonic() + self.queue_timeout_s
        delay = 0.005
        while True:
            prefills = self.directory.of_kind("prefill")
            decodes = {w.worker_id: w for w in self.directory.of_kind("decode")}
            if prefills and decodes:
                by_id = {w.worker_id: w for w in prefills}
                prefill = by_id[self.prefill_policy.rank([w.load() for w in prefills])[0]]
                for worker_id in self.decode_policy.rank([w.load() for w in decodes.values()]):
                    decode = decodes[worker_id]
                    try:
                        endpoint = await asyncio.wait_for(
                            decode.handle.reserve.remote(transfer_id, n_prompt, prefill.endpoint, self.transfer_timeout_s),
                            timeout=CALL_TIMEOUT_S)
                    except Exception as exc:  # dead or stuck worker: try the next one
                        log.warning("reserve on %s failed: %r", worker_id, exc)
                        continue
                    if endpoint is not None:
                        timings.reserved = time.perf_counter()
                        return prefill, decode
            if time.monotonic() >= deadline:
                raise NoCapacityError(f"no decode worker had room for {n_prompt} prompt tokens within {self.queue_timeout_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
