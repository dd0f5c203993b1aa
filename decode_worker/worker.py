"""The decode worker: a Ray actor that receives KV and streams tokens.

Lifecycle of one request here (its reserve and decode steps; the whole path
is in docs/architecture.md, "Request lifecycle"):

1. ``reserve`` (from the router): blocks for the prompt plus one token are
   held under a lease, and the transport is told to expect the KV from the
   named prefill worker. No room → ``None``, and the router tries elsewhere.
   Given the token ids, the reservation starts with the blocks of the
   prompt's prefix that this worker caches (an earlier turn of the
   conversation, a shared system prompt): only the KV after them is
   expected, and the answer (:class:`Reserved`) says from which token.
2. The prefill worker pushes the KV straight into this worker's transport.
3. ``generate`` (a streaming call from the router) waits for the transfer,
   imports the KV into the reserved blocks, yields an acknowledgement (the
   router then lets the prefill worker free its copy), and joins the request
   to the continuous batch; every step's tokens are yielded as they come.
4. A lease that expires before its KV arrives frees its blocks; a cancelled
   stream aborts the request and frees its blocks at once, and a call for an
   aborted id that arrives late is refused.
5. ``rearm`` expects the KV again after a failed push (the router then asks
   the prefill worker to resend); ``serve`` runs a whole request here,
   prefill included: colocated serving, or a recompute when the KV could not
   be moved, or a resume after another decode worker died.

A request with ``n`` > 1 samples: ``reserve`` holds the prompt's blocks once
plus one spare block per other sample (for its copy on write), ``generate``
imports the one KV and forks the samples that go on
(``KVHandoffMeta.samples``), ``serve`` prefills once and forks; the stream
carries every sample's chunks (``TokenChunk.index``), and an abort ends them all.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import torch

from engine.async_engine import RequestFailedError
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.sequence import sample_request_id
from kvtransfer.base import TransferStatus
from kvtransfer.endpoints import Endpoint
from worker_common.chunk_coalescer import coalesced
from worker_common.messages import Ack, DecodeEvent, ErrorReason, KVHandoffMeta, Reserved, TokenChunk, WorkerError
from worker_common.transfer_wait import wait_transfer
from worker_common.worker_base import Preloaded, WorkerBase
from worker_common.worker_config import DecodeEngineConfig, HandoffSettings, ModelConfig
from worker_common.worker_status import WorkerStatus


class DecodeWorker(WorkerBase):
    """Plain class; the pool manager wraps it with ``ray.remote``."""

    kind = "decode"

    def __init__(self, worker_id: str, *, model: ModelConfig, engine: DecodeEngineConfig,
                 handoff: HandoffSettings, preloaded: Preloaded | None = None) -> None:
        super().__init__(worker_id, model=model, engine_args=engine.engine_args(), batch_wait_s=0.0,
                         handoff=handoff, threads=engine.threads, preloaded=preloaded)
        self._leases: dict[str, float] = {}  # transfer_id -> deadline, until imported
        # transfer_id -> the id its KV travels under: a re-armed push gets a fresh
        # one, so nothing left of the failed try (store keys, pair state) is reused.
        self._wire: dict[str, str] = {}
        self._samples: dict[str, int] = {}  # transfer_id -> its number of samples (n > 1), while it is here
        self.tokens_generated = 0
        self.kv_imports = 0
        self.stream_interval_s = engine.stream_interval_ms / 1000

    def status(self) -> WorkerStatus:
        return replace(super().status(), tokens_generated=self.tokens_generated, kv_imports=self.kv_imports,
                       recent_latencies=tuple(self.latencies))

    # ------------------------------------------------------------ requests
    async def reserve(self, transfer_id: str, num_kv_tokens: int, sender: Endpoint,
                      timeout_s: float = 30.0, token_ids: list[int] | None = None, n: int = 1) -> Reserved | None:
        """Hold blocks for an incoming KV of ``num_kv_tokens`` tokens (plus the
        next one); ``None`` if full. ``token_ids`` (the KV's tokens): reuse
        the cached prefix of them, and expect only the KV after it. ``n``: the
        samples that will share the KV (one spare block for each other one)."""
        self._reap(self._leases, self._expire)
        if n > 1:
            self._samples[transfer_id] = n
        cached = await self._hold(transfer_id, num_kv_tokens, token_ids, n=n)
        if cached is None:
            return None
        self._expect(transfer_id, num_kv_tokens - cached, sender, timeout_s)
        return Reserved(self.kv_transport.endpoint(), cached)

    async def _hold(self, transfer_id: str, num_kv_tokens: int, token_ids: list[int] | None = None,
                    max_cached: int | None = None, n: int = 1) -> int | None:
        """Reserve blocks for the KV plus the next token, unless the request was (or is being) aborted;
        the number of leading tokens found cached, or ``None``."""
        if self._was_aborted(transfer_id):
            return None
        reservation = await self.engine.call(
            lambda e: e.reserve(transfer_id, num_kv_tokens + 1, token_ids, max_cached, n))
        if reservation is None:
            return None
        if self._was_aborted(transfer_id):  # the abort ran while the blocks were being reserved
            await self.engine.call(lambda e: e.cancel_reservation(transfer_id))
            return None
        return reservation.cached_tokens

    async def rearm(self, transfer_id: str, wire_id: str, num_kv_tokens: int, sender: Endpoint,
                    timeout_s: float = 30.0, token_ids: list[int] | None = None,
                    kv_start: int = 0) -> Endpoint | None:
        """After a failed transfer: expect the KV (from token ``kv_start``, as
        first reserved) again, under ``wire_id``, into the same reservation. If
        the lease had run out meanwhile (a prefill queue longer than the
        lease), reserve again, which must find the same ``kv_start`` tokens
        cached; ``None`` if there is no room or they are gone."""
        if self._was_aborted(transfer_id):
            return None
        if transfer_id not in self._leases:
            cached = await self._hold(transfer_id, num_kv_tokens, token_ids if kv_start else None, kv_start,
                                      self._samples.get(transfer_id, 1))
            if cached is None:
                return None
            if cached != kv_start:  # evicted meanwhile: the push would miss tokens
                await self.engine.call(lambda e: e.cancel_reservation(transfer_id))
                return None
        self._drop_wire(transfer_id)
        self._expect(transfer_id, num_kv_tokens - kv_start, sender, timeout_s, wire_id)
        return self.kv_transport.endpoint()

    def _expect(self, transfer_id: str, num_kv_tokens: int, sender: Endpoint, timeout_s: float,
                wire_id: str | None = None) -> None:
        """Expect ``num_kv_tokens`` tokens' KV (what is not cached here) from ``sender``."""
        lay = self.layout
        self._wire[transfer_id] = wire_id or transfer_id
        self.kv_transport.expect(self._wire[transfer_id], lay.kv_shape(num_kv_tokens), getattr(torch, lay.dtype),
                                 sender, timeout_s)
        self._leases[transfer_id] = time.monotonic() + self.lease_s

    def _drop_wire(self, transfer_id: str) -> None:
        wire = self._wire.pop(transfer_id, transfer_id)
        self.kv_transport.abort(wire)
        self.kv_transport.forget(wire)

    async def generate(self, transfer_id: str, handoff: KVHandoffMeta, params: SamplingParams,
                       timeout_s: float, emitted_text: str) -> AsyncIterator[DecodeEvent]:
        """Wait for the KV, import it, acknowledge, then stream tokens.

        ``handoff`` came with the prefill worker's result; ``emitted_text`` is
        all the text the client has been sent so far. Yields an :class:`Ack`
        first, then a :class:`TokenChunk` per step (or a :class:`WorkerError`).
        """
        t_called = time.time()
        wire = self._wire.get(transfer_id, transfer_id)
        status = await wait_transfer(self.kv_transport, wire, timeout_s)
        if status != TransferStatus.SUCCESS or self._was_aborted(transfer_id):
            error = self.kv_transport.error(wire)
            self._drop_wire(transfer_id)
            await self._drop_lease(transfer_id)
            yield WorkerError(ErrorReason.TRANSFER_FAILED, error or status.name)
            return
        data = self.kv_transport.result(wire)
        self._drop_wire(transfer_id)
        self._leases.pop(transfer_id, None)
        kv = handoff.with_data(transfer_id, data)
        self.kv_imports += 1
        indices = [s.index for s in handoff.samples] or [0]
        # aclosing (here and below): a stream closed at a yield (a cancel) closes the engine's stream
        # at once, whose cleanup aborts every sample still running, not when the generator is collected.
        async with aclosing(self._run(transfer_id, indices, params, t_called, kv.num_tokens,
                                      lambda e: e.import_kv(kv, params, request_id=transfer_id,
                                                            emitted_text=emitted_text,
                                                            samples=handoff.samples))) as events:
            async for ev in events:
                yield ev

    async def serve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    output_token_ids: list[int] | None = None,
                    emitted_text: str | None = None, n: int = 1) -> AsyncIterator[DecodeEvent]:
        """Run a whole request here, prefill included (colocated serving, and
        recompute when KV cannot be moved). Resumes after ``output_token_ids``.
        ``n`` > 1: the prompt is prefilled once and forked into ``n`` samples.

        Yields an :class:`Ack` once the request has joined the engine, then
        what :meth:`generate` yields.
        """
        if self._was_aborted(request_id):
            yield WorkerError(ErrorReason.ABORTED)
            return
        start = (lambda e: e.add_request(request_id, params=params, prompt_token_ids=prompt_token_ids,
                                         output_token_ids=output_token_ids, emitted_text=emitted_text, n=n))
        if n > 1:
            self._samples[request_id] = n
        try:
            async with aclosing(self._run(request_id, list(range(n)), params, time.time(), 0, start)) as events:
                async for ev in events:
                    yield ev
        except InvalidRequestError as e:
            yield WorkerError(ErrorReason.INVALID_REQUEST, e.reason, field=e.field)

    def _run(self, request_id: str, indices: list[int], params: SamplingParams, t_called: float,
             num_kv_tokens: int, start) -> AsyncIterator[DecodeEvent]:
        """:meth:`_outputs`, each sample's chunks merged to at most one per ``stream_interval_ms``."""
        return coalesced(self._outputs(request_id, indices, params, t_called, num_kv_tokens, start),
                         self.stream_interval_s)

    async def _outputs(self, request_id: str, indices: list[int], params: SamplingParams, t_called: float,
                       num_kv_tokens: int, start) -> AsyncIterator[DecodeEvent]:
        """Stream the outputs of samples ``indices`` of one request from the engine, ack first;
        keeps the counters. A request the engine fails on its own ends with a ``REQUEST_FAILED``
        :class:`WorkerError`."""
        index_of = {sample_request_id(request_id, i): i for i in indices}
        budget = params.max_tokens * len(indices)
        self.outstanding_tokens += budget
        produced = 0
        first_tokens_at: dict[int, tuple[float, int]] = {}  # per sample: when its first tokens came, and how many
        made: dict[int, int] = {}
        try:
            first = True
            async with aclosing(self.engine.stream_group(list(index_of), start)) as outs:
                async for out in outs:
                    if first:
                        first = False
                        stamps = getattr(out, "timestamps", None) or {}
                        yield Ack(t_called, time.time(), num_kv_tokens, stamps.get("scheduled"), stamps.get("first_token"),
                                  out.num_cached_tokens)
                    if out.finish_reason == "abort":
                        yield WorkerError(ErrorReason.ABORTED)
                        return
                    i = index_of[out.request_id]
                    produced += len(out.new_token_ids)
                    made[i] = made.get(i, 0) + len(out.new_token_ids)
                    if i not in first_tokens_at and out.new_token_ids:
                        first_tokens_at[i] = (time.time(), made[i])
                    elif out.finished and i in first_tokens_at and made[i] > first_tokens_at[i][1]:
                        now = time.time()  # TPOT: the mean gap after the first tokens this worker produced
                        t0, k0 = first_tokens_at[i]
                        self.latencies.append((now, (now - t0) / (made[i] - k0)))
                    yield TokenChunk(tuple(out.new_token_ids), out.new_text, out.finished, out.finish_reason,
                                     tuple(out.logprobs or ()), index=i)
        except RequestFailedError as e:  # the engine already dropped it and freed its blocks
            yield WorkerError(ErrorReason.REQUEST_FAILED, str(e))
        finally:
            self._samples.pop(request_id, None)
            self.outstanding_tokens -= budget
            self.tokens_generated += produced
            self.requests_served += 1

    async def abort(self, transfer_id: str) -> bool:
        """Cancel wherever the request is (reserved, in transfer, decoding); a
        call for it that arrives later is refused."""
        self._tombstone(transfer_id)
        self._drop_wire(transfer_id)
        self._leases.pop(transfer_id, None)
        return await self.engine.abort(transfer_id, self._samples.pop(transfer_id, 1))

    async def _drop_lease(self, transfer_id: str) -> None:
        self._leases.pop(transfer_id, None)
        self._samples.pop(transfer_id, None)
        await self.engine.call(lambda e: e.cancel_reservation(transfer_id))

    async def _expire(self, transfer_id: str) -> None:
        """A reservation whose KV never came within the lease."""
        self._drop_wire(transfer_id)
        await self._drop_lease(transfer_id)

