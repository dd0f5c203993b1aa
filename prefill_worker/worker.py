"""The prefill worker: a Ray actor that prefills prompts and pushes their KV.

Lifecycle of one request here (its prefill step; the whole path is in
docs/architecture.md, "Request lifecycle"):

1. ``prefill`` arrives from the router with the prompt's token ids, the
   sampling parameters, a ``transfer_id`` and the endpoint of the decode
   worker that has reserved blocks for it.
2. The request joins this worker's engine, which batches concurrent prompts
   (within ``max_batched_tokens``, after waiting ``batch_wait_ms`` for company
   when idle) and runs prefill; exactly one token is sampled.
3. If that token already ends the request (EOS, ``max_tokens`` 1), the
   result says so and no KV moves. Otherwise the KV is exported and pushed to
   the reserved destination through the configured ``kvtransfer`` backend.
4. When the push has succeeded, the first token and the hand-off metadata
   go back to the router (a ``PrefillResult``; the types are in
   ``worker_common.messages``). The blocks stay held until the router's
   ``release`` (sent once the decode side acknowledged) or until the hold's
   lease expires, whichever comes first.
5. A failed push comes back as the result's ``push``: a ``WorkerError`` with
   ``kv_held`` set, and the KV stays held: the router may re-arm the decode
   side and call ``resend``, or ``abort``.
   A cancel frees the blocks at once, and a prefill that arrives after its
   abort is refused. A request the engine fails on its own comes back as a
   ``WorkerError`` with ``REQUEST_FAILED``. A failure is a value, never a dead worker.

A request with ``n`` > 1 samples is prefilled once: the engine forks it
into ``n`` samples over the one copy of the prompt's KV, each draws its first
token, and the KV is exported and pushed once, with the samples that go on
(``KVHandoffMeta.samples``). ``release`` and ``abort`` free all ``n``.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from engine.async_engine import RequestFailedError
from engine.llm_engine import RequestOutput
from engine.kv_handoff import SampleStart
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.sequence import sample_request_id
from kvtransfer.base import TransferStatus
from kvtransfer.endpoints import Endpoint
from worker_common.messages import ErrorReason, KVHandoffMeta, KVPushed, PrefillResult, TokenChunk, WorkerError
from worker_common.transfer_wait import wait_transfer
from worker_common.worker_base import Preloaded, WorkerBase
from worker_common.worker_config import HandoffSettings, ModelConfig, PrefillEngineConfig
from worker_common.worker_status import WorkerStatus


class PrefillWorker(WorkerBase):
    """Plain class; the pool manager wraps it with ``ray.remote``."""

    kind = "prefill"

    def __init__(self, worker_id: str, *, model: ModelConfig, engine: PrefillEngineConfig,
                 handoff: HandoffSettings, preloaded: Preloaded | None = None) -> None:
        super().__init__(worker_id, model=model, engine_args=engine.engine_args(),
                         batch_wait_s=engine.batch_wait_ms / 1000, handoff=handoff, threads=engine.threads,
                         preloaded=preloaded)
        self._holds: dict[str, float] = {}  # transfer_id -> lease deadline
        self._wire: dict[str, str] = {}  # transfer_id -> the id of its push in flight (fresh on a resend)
        self._kv_start: dict[str, int] = {}  # transfer_id -> first token whose KV is pushed (decode caches the rest)
        self._meta_samples: dict[str, tuple[SampleStart, ...]] = {}  # transfer_id -> its samples that go on decoding
        self._samples: dict[str, int] = {}  # transfer_id -> its number of samples (n), while any is here
        self._exporter: dict[str, str] = {}  # transfer_id -> the engine id of the sample whose (shared) KV is pushed
        self.prefills = 0  # prompts prefilled (a request with n samples counts once)
        self.tokens_prefilled = 0
        self.transfer_seconds = 0.0

    def status(self) -> WorkerStatus:
        base = super().status()
        # Push time as the sender sees it (export + send + wait for the receiver's ack).
        return replace(base, kv_transfer=replace(base.kv_transfer, seconds_sent=self.transfer_seconds),
                       held=len(self._holds), tokens_prefilled=self.tokens_prefilled, prefills=self.prefills,
                       recent_latencies=tuple(self.latencies))

    # ------------------------------------------------------------ requests
    async def prefill(
        self,
        transfer_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        decode_endpoint: Endpoint,
        timeout_s: float = 30.0,
        output_token_ids: list[int] | None = None,
        emitted_text: str | None = None,
        kv_start: int = 0,
        n: int = 1,
    ) -> PrefillResult | WorkerError:
        """Prefill one prompt and push its KV; see the module docstring.

        ``output_token_ids``/``emitted_text`` resume a request whose first
        outputs were streamed by a worker that died: they are prefilled with
        the prompt and the next token is sampled. ``kv_start``: the decode
        side already caches the KV of the first ``kv_start`` tokens; only the
        KV from there on is pushed. The prefill itself skips whatever prefix
        this worker's own cache holds. ``n`` > 1: ``n`` samples of the prompt
        (module docstring); the result's ``firsts`` hold each one's first chunk.
        """
        t_received = time.time()
        self._reap(self._holds, self._drop)
        if self._was_aborted(transfer_id):
            return WorkerError(ErrorReason.ABORTED, "before prefill started")
        n_tokens = len(prompt_token_ids) + len(output_token_ids or ())
        self.outstanding_tokens += n_tokens
        if n > 1:
            self._samples[transfer_id] = n
        try:
            firsts = await self._first_tokens(transfer_id, prompt_token_ids, params, output_token_ids, emitted_text, n)
        except InvalidRequestError as e:  # e.g. a prompt larger than this worker's KV cache
            self._samples.pop(transfer_id, None)
            return WorkerError(ErrorReason.INVALID_REQUEST, e.reason, field=e.field)
        except RequestFailedError as e:  # this request alone failed in the engine (its blocks are free)
            self._samples.pop(transfer_id, None)
            return WorkerError(ErrorReason.REQUEST_FAILED, str(e))
        finally:
            self.outstanding_tokens -= n_tokens
        t_prefilled = time.time()
        if len(firsts) < n or any(f.finish_reason == "abort" for f in firsts):
            self._samples.pop(transfer_id, None)
            return WorkerError(ErrorReason.ABORTED)
        self.requests_served += 1
        self.prefills += 1
        self.tokens_prefilled += n_tokens
        stamps = getattr(firsts[0], "timestamps", None) or {}
        chunks = tuple(TokenChunk(tuple(f.new_token_ids), f.new_text, f.finished, f.finish_reason,
                                  tuple(f.logprobs or ()), index=i) for i, f in enumerate(firsts))
        result = PrefillResult(
            worker_id=self.worker_id,
            first=chunks[0],
            others=chunks[1:],
            t_received=t_received,
            t_prefill_start=stamps.get("scheduled", t_received),
            t_prefill_end=stamps.get("first_token", t_prefilled),
            cached_tokens=firsts[0].num_cached_tokens,
        )
        if result.finished:
            self._samples.pop(transfer_id, None)
            self._record_latency(t_received)
            return result
        live = [i for i, c in enumerate(chunks) if not c.finished]
        self._exporter[transfer_id] = sample_request_id(transfer_id, live[0])
        samples: tuple[SampleStart, ...] = ()
        if n > 1:
            seeds = await self.engine.call(
                lambda e: [e.seed_of(sample_request_id(transfer_id, i)) for i in live])
            samples = tuple(SampleStart(i, chunks[i].token_ids[0], seed, chunks[i].text) for i, seed in zip(live, seeds))
        self._kv_start[transfer_id] = kv_start
        push = await self._push(transfer_id, decode_endpoint, timeout_s, samples=samples)
        if isinstance(push, WorkerError) and push.reason is ErrorReason.ABORTED:
            return push
        if isinstance(push, KVPushed):
            self._record_latency(t_received)
        return replace(result, push=push)

    def _record_latency(self, t_received: float) -> None:
        """This worker's part of the request's TTFT: the call's arrival to the first token ready to leave."""
        now = time.time()
        self.latencies.append((now, now - t_received))

    async def _first_tokens(self, transfer_id: str, prompt_token_ids: list[int], params: SamplingParams,
                            output_token_ids: list[int] | None, emitted_text: str | None,
                            n: int) -> list[RequestOutput]:
        """Run the prefill in this worker's batch; the last output of each sample's stream, in index order
        (fewer than ``n`` when the stream ended early)."""
        ids = [sample_request_id(transfer_id, i) for i in range(n)]
        last: dict[str, RequestOutput] = {}
        async with aclosing(self.engine.stream_group(
            ids,
            lambda e: e.add_request(transfer_id, params=params, prompt_token_ids=prompt_token_ids,
                                    export_after_prefill=True, output_token_ids=output_token_ids,
                                    emitted_text=emitted_text, n=n),
        )) as outs:
            async for out in outs:
                last[out.request_id] = out
                if out.finish_reason == "abort":
                    return [out]
        return [last[i] for i in ids if i in last]

    async def resend(self, transfer_id: str, wire_id: str, decode_endpoint: Endpoint,
                     timeout_s: float) -> KVPushed | WorkerError:
        """Push a held KV again, under the fresh ``wire_id``, after a failed
        transfer (the decode side re-armed its reservation for that id)."""
        if self._holds.pop(transfer_id, None) is None or self._was_aborted(transfer_id):
            return WorkerError(ErrorReason.NO_HELD_KV, "nothing held to resend")
        return await self._push(transfer_id, decode_endpoint, timeout_s, wire_id)

    async def _push(self, transfer_id: str, decode_endpoint: Endpoint, timeout_s: float,
                    wire_id: str | None = None, samples: tuple[SampleStart, ...] | None = None) -> KVPushed | WorkerError:
        """Export and send the parked KV. On failure the KV stays held (under
        the hold lease) so that the router can ask for one more try."""
        t_start = time.time()
        wire = self._wire[transfer_id] = wire_id or transfer_id
        start = self._kv_start.get(transfer_id, 0)
        exporter = self._exporter.get(transfer_id, transfer_id)
        if samples is not None:
            self._meta_samples[transfer_id] = samples
        handoff = await self.engine.call(lambda e: e.export_kv(exporter, start))
        self.kv_transport.send(wire, handoff.data, decode_endpoint, timeout_s)
        status = await wait_transfer(self.kv_transport, wire, timeout_s)
        error = self.kv_transport.error(wire)
        self.kv_transport.forget(wire)
        self._wire.pop(transfer_id, None)
        if self._was_aborted(transfer_id):
            await self.engine.abort(transfer_id, self._samples.get(transfer_id, 1))
            return WorkerError(ErrorReason.ABORTED, "during transfer")
        self._holds[transfer_id] = time.monotonic() + self.lease_s
        if status != TransferStatus.SUCCESS:
            return WorkerError(ErrorReason.TRANSFER_FAILED, error or status.name, kv_held=True)
        self.transfer_seconds += time.time() - t_start
        return KVPushed(KVHandoffMeta.of(handoff, self._meta_samples.get(transfer_id, ())), handoff.nbytes, t_start,
                        time.time())

    async def release(self, transfer_id: str) -> bool:
        """The decode side has the KV: free this side's blocks (every sample's)."""
        if self._holds.pop(transfer_id, None) is None:
            return False
        await self.engine.abort(transfer_id, self._forget(transfer_id))
        return True

    async def abort(self, transfer_id: str) -> bool:
        """Cancel wherever the request is (queued, prefilling, pushing, held);
        a prefill call that arrives after this is refused."""
        self._tombstone(transfer_id)
        self._holds.pop(transfer_id, None)
        self.kv_transport.abort(self._wire.get(transfer_id, transfer_id))
        return await self.engine.abort(transfer_id, self._forget(transfer_id))

    async def _drop(self, transfer_id: str) -> None:
        """A hold whose acknowledgement never came (router died, stream lost)."""
        await self.engine.abort(transfer_id, self._forget(transfer_id))

    def _forget(self, transfer_id: str) -> int:
        """Drop what this worker keeps about ``transfer_id``; its number of samples."""
        self._kv_start.pop(transfer_id, None)
        self._exporter.pop(transfer_id, None)
        self._meta_samples.pop(transfer_id, None)
        return self._samples.pop(transfer_id, 1)
