"""The engine: requests in, token streams out, one ``step()`` at a time.

A step reads as schedule → run → postprocess:

1. the :class:`~engine.scheduler.Scheduler` picks tokens to compute (new
   requests join between steps, finished ones have already left);
2. the :class:`~engine.model_runner.ModelRunner` runs them through the model
   over the paged KV cache and returns logits where a token is due;
3. postprocessing samples, detokenizes incrementally, applies stop
   conditions, and frees the blocks of every finished sequence at once.

A request may ask to stop after prefill (``export_after_prefill``): its
first token is sampled, its blocks are kept, and :meth:`LLMEngine.export_kv`
hands its KV to another engine, which continues with :meth:`import_kv`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from analysis.cost_model import ModelDims, dtype_bytes
from analysis.machine_peaks import MachinePeaks
from engine.chat_prompt import chat_prompt_ids
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import PagedKVCache
from engine.kv_cache_manager import KVCacheManager, blocks_needed
from engine.kv_handoff import KVHandoff, KVLayoutMismatchError
from engine.model_loader import LoadedModel
from engine.model_runner import ModelRunner, kv_layout_of
from engine.sampler import SamplingError, TokenLogprob, sample, token_logprobs
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.step_stats import StepStats, StepStatsSnapshot

DEFAULT_NUM_BLOCKS = 1024


@dataclass
class RequestOutput:
    """What one step produced for one request.

    ``kv_ready`` is set when an ``export_after_prefill`` request has its first
    token and its KV is waiting in :meth:`LLMEngine.export_kv`.
    ``timestamps`` is set on the first output a request produces in this
    engine only: its ``Sequence.timestamps`` (``added``, ``scheduled``,
    ``first_token``; ``time.time()`` seconds).
    ``finish_reason == "error"`` ends a request that failed on its own (e.g.
    its logits could not be sampled); ``error`` says why. Nothing else in the
    batch is affected.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    kv_ready: bool = False
    timestamps: dict[str, float] | None = None
    error: str | None = None  # with finish_reason "error": why this request (alone) failed
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request's params ask for them


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    seed: int
    pending_text: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()  # the params' ids as a set: checked once per token

    @classmethod
    def of(cls, seq: Sequence, detok: IncrementalDetokenizer, seed: int) -> _Request:
        return cls(seq, detok, seed, stop_token_ids=frozenset(seq.params.stop_token_ids))


class LLMEngine:
    """Continuous-batching generation over a paged KV cache.

    ``num_blocks`` or ``kv_cache_bytes`` (not both) sizes the cache;
    ``max_batched_tokens`` is the per-step token budget (longer prompts are
    prefilled in chunks); ``max_running`` caps the running batch.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        max_running: int = 64,
        max_batched_tokens: int = 2048,
        peaks: MachinePeaks | None = None,
    ) -> None:
        if num_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("give num_blocks or kv_cache_bytes, not both")
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_model_len = model.max_model_len
        self.layout = kv_layout_of(model.model)
        if kv_cache_bytes is not None:
            num_blocks = PagedKVCache.num_blocks_for_budget(self.layout, block_size, kv_cache_bytes)
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_bytes={kv_cache_bytes} holds no block of "
                    f"{PagedKVCache.bytes_per_block(self.layout, block_size)} bytes"
                )
        num_blocks = DEFAULT_NUM_BLOCKS if num_blocks is None else num_blocks
        self.kv = KVCacheManager(num_blocks, block_size)
        self.cache = PagedKVCache(self.layout, num_blocks, block_size)
        self.runner = ModelRunner(model.model, self.cache)
        self.scheduler = Scheduler(self.kv, max_running, max_batched_tokens)
        self._requests: dict[str, _Request] = {}
        self._parked: dict[str, _Request] = {}
        self._reserved: set[str] = set()
        self._arrivals = 0
        self.num_steps = 0
        # Per-step time, batch, tokens, modelled bytes/FLOPs; MBU/MFU against ``peaks``.
        self.step_accounting = StepStats(ModelDims.from_hf_config(model.config), dtype_bytes(self.layout.dtype), peaks)

    # ----------------------------------------------------------------- input
    def tokenize(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages through the model's chat template
        (:func:`~engine.chat_prompt.chat_prompt_ids`: special-token text in a message stays text)."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt or messages")
        if messages is not None:
            if not messages:
                raise InvalidRequestError("messages", "must not be empty")
            return chat_prompt_ids(self.tokenizer, messages)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict] | None = None,
        export_after_prefill: bool = False,
        output_token_ids: list[int] | None = None,
        emitted_text: str | None = None,
    ) -> None:
        """Queue a request; raises :class:`InvalidRequestError` (naming the field) before any state changes.

        ``output_token_ids`` resumes a request whose first outputs were
        produced elsewhere (a worker that died): they are recomputed with the
        prompt, count towards ``max_tokens`` and are not streamed again;
        ``emitted_text`` is the text already streamed for them.
        """
        params = params or SamplingParams()
        params.validate()
        if request_id in self._requests or request_id in self._parked:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenize(prompt, messages)
        prior = list(output_token_ids or [])
        if prior and len(prior) >= params.max_tokens:
            raise InvalidRequestError("output_token_ids", f"{len(prior)} outputs already reach max_tokens={params.max_tokens}")
        self._check_prompt(list(prompt_token_ids) + prior, params, export_after_prefill)
        seq = Sequence(request_id, list(prompt_token_ids), params, arrival=self._arrivals,
                       output_token_ids=prior, export_after_prefill=export_after_prefill)
        self._arrivals += 1
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop)
        for t in prior:
            detok.skip_token(t)
        if emitted_text is not None:
            detok.mark_emitted(len(emitted_text))
        self._requests[request_id] = _Request.of(seq, detok, seed)
        self.scheduler.add(seq)

    def _check_prompt(self, ids: list[int], params: SamplingParams, prefill_only: bool = False) -> None:
        if not ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens leave no room to generate within the context of {self.max_model_len}"
            )
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise InvalidRequestError("prompt_token_ids", f"token ids must be in [0, {vocab})")
        # A prefill-only engine holds just the prompt and its first token.
        total = len(ids) + 1 if prefill_only else min(len(ids) + params.max_tokens, self.max_model_len)
        if blocks_needed(total, self.kv.block_size) > self.kv.num_blocks:
            raise InvalidRequestError(
                "max_tokens",
                f"prompt + max_tokens = {total} tokens exceeds this engine's KV cache of {self.kv.capacity_tokens()} tokens",
            )

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request wherever it is; its blocks are free on return."""
        if self.cancel_reservation(request_id):
            return True
        req = self._requests.pop(request_id, None) or self._parked.pop(request_id, None)
        if req is None:
            return False
        if req.seq.status == SequenceStatus.PARKED:
            self.kv.free(request_id)
        else:
            self.scheduler.remove(req.seq)
        req.seq.status = SequenceStatus.FINISHED_ABORTED
        return True

    # ------------------------------------------------------------------ step
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return what each touched request produced."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        sampled_chunks, logits = self.runner.execute(plan.chunks, self.kv)
        for c in plan.chunks:
            c.seq.num_computed_tokens = c.start + c.num_tokens
        self.num_steps += 1
        reqs = [self._requests[c.seq.request_id] for c in sampled_chunks]
        tokens = sample(
            logits,
            [r.seq.params for r in reqs],
            [r.seed for r in reqs],
            [len(r.seq.output_token_ids) for r in reqs],
        )
        lps = token_logprobs(logits, [r.seq.params for r in reqs], tokens)
        outs = [self._fail(r, t) if isinstance(t, SamplingError) else self._postprocess(r, t, lp)
                for r, t, lp in zip(reqs, tokens, lps)]
        self.step_accounting.record_chunks(plan.chunks, time.perf_counter() - t0)
        return outs

    def _fail(self, req: _Request, error: SamplingError) -> RequestOutput:
        """End one request whose step went wrong (its blocks are freed); the rest of the batch goes on."""
        seq = req.seq
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED_ABORTED
        del self._requests[seq.request_id]
        return RequestOutput(seq.request_id, [], "", finished=True, finish_reason="error", error=str(error),
                             num_prompt_tokens=len(seq.prompt_token_ids), num_output_tokens=len(seq.output_token_ids))

    def _postprocess(self, req: _Request, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        seq, params = req.seq, req.seq.params
        seq.output_token_ids.append(token)
        status = None
        if (not params.ignore_eos and token in self.model.eos_token_ids) or token in req.stop_token_ids:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
            text = req.detok.flush()
        else:
            text = req.detok.add_token(token)
            if req.detok.stopped_by is not None:
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, req.detok.stopped_by
            elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                status = SequenceStatus.FINISHED_LENGTH
                text += req.detok.flush()
        out = RequestOutput(seq.request_id, [token], text, num_prompt_tokens=len(seq.prompt_token_ids),
                            num_output_tokens=len(seq.output_token_ids),
                            logprobs=[logprob] if logprob is not None else None)
        if "first_token" not in seq.timestamps:
            seq.timestamps["first_token"] = time.time()
            out.timestamps = dict(seq.timestamps)
        if status is not None:
            self.scheduler.remove(seq)
            seq.status = status
            del self._requests[seq.request_id]
            out.finished, out.finish_reason = True, status.finish_reason
        elif seq.export_after_prefill:
            self.scheduler.detach(seq)
            seq.status = SequenceStatus.PARKED
            self._parked[seq.request_id] = self._requests.pop(seq.request_id)
            out.kv_ready = True
        return out

    # ------------------------------------------------------------- hand-off
    def export_kv(self, request_id: str) -> KVHandoff:
        """Copy a parked request's KV out; its blocks stay held until :meth:`release`."""
        req = self._parked[request_id]
        seq = req.seq
        slots = torch.tensor([self.kv.slot(request_id, p) for p in range(seq.num_computed_tokens)], dtype=torch.long)
        data = self.cache.read_tokens(slots)
        return KVHandoff(request_id, self.layout, list(seq.prompt_token_ids), list(seq.output_token_ids), req.seed, data)

    def release(self, request_id: str) -> None:
        """Free a parked request's blocks (after the receiver acknowledged its KV)."""
        self._parked.pop(request_id)
        self.kv.free(request_id)

    def reserve(self, request_id: str, num_tokens: int) -> bool:
        """Hold blocks for ``num_tokens`` tokens of a request that will be imported.

        Counts against ``max_running``; ``False`` when there is no room now.
        """
        if self._in_use(request_id):
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        if len(self.scheduler.running) + len(self._reserved) >= self.scheduler.max_running:
            return False
        if not self.kv.allocate_slots(request_id, num_tokens):
            return False
        self._reserved.add(request_id)
        return True

    def cancel_reservation(self, request_id: str) -> bool:
        """Free a reservation that will not be imported (lease expired, transfer failed)."""
        if request_id not in self._reserved:
            return False
        self._reserved.discard(request_id)
        self.kv.free(request_id)
        return True

    def _in_use(self, request_id: str) -> bool:
        return request_id in self._requests or request_id in self._parked or request_id in self._reserved

    def import_kv(self, handoff: KVHandoff, params: SamplingParams, request_id: str | None = None,
                  emitted_text: str | None = None) -> bool:
        """Continue decoding a request prefilled elsewhere.

        Uses the blocks of a :meth:`reserve` made under ``request_id`` if
        there is one. Returns ``False`` when there is no room now (blocks or
        running slots); raises :class:`KVLayoutMismatchError` when the KV was
        computed with another layout. Tokens already in the hand-off are not
        streamed again; ``emitted_text`` (the text the sender already
        streamed for them, when it held some back for stop strings) keeps the
        text stream seamless.
        """
        diffs = self.layout.mismatches(handoff.layout)
        if diffs:
            raise KVLayoutMismatchError("KV layout mismatch (theirs != ours): " + "; ".join(diffs))
        params.validate()
        request_id = request_id or handoff.request_id
        reserved = request_id in self._reserved
        if request_id in self._requests or request_id in self._parked:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        self._check_prompt(handoff.prompt_token_ids, params)
        seq = Sequence(request_id, list(handoff.prompt_token_ids), params, arrival=self._arrivals,
                       output_token_ids=list(handoff.output_token_ids), num_computed_tokens=handoff.num_tokens)
        if seq.num_uncomputed_tokens != 1:
            raise ValueError(f"hand-off covers {handoff.num_tokens} of {seq.num_tokens} tokens; expected all but the last")
        if not reserved and len(self.scheduler.running) + len(self._reserved) >= self.scheduler.max_running:
            return False
        if not self.kv.allocate_slots(request_id, seq.num_tokens):
            return False
        self._reserved.discard(request_id)
        slots = torch.tensor([self.kv.slot(request_id, p) for p in range(handoff.num_tokens)], dtype=torch.long)
        self.cache.write_tokens(slots, handoff.data)
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop)
        for t in seq.output_token_ids:
            detok.skip_token(t)
        if emitted_text is not None:
            detok.mark_emitted(len(emitted_text))
        self._arrivals += 1
        self._requests[request_id] = _Request.of(seq, detok, handoff.seed)
        self.scheduler.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        return True

    # ------------------------------------------------------------ utilities
    def stats(self) -> dict[str, int]:
        return {
            "num_blocks": self.kv.num_blocks,
            "free_blocks": self.kv.num_free_blocks,
            "used_blocks": self.kv.num_blocks - self.kv.num_free_blocks,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "parked": len(self._parked),
            "reserved": len(self._reserved),
            "preemptions": self.scheduler.num_preemptions,
        }

    def step_stats(self) -> StepStatsSnapshot:
        """Step accounting since start and over the recent window (:meth:`StepStats.snapshot`)."""
        return self.step_accounting.snapshot()

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None) -> list["Completion"]:
        """Run ``prompts`` to completion together; return them in order."""
        ids = [f"gen-{self._arrivals + i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            if isinstance(p, str):
                self.add_request(rid, p, params)
            else:
                self.add_request(rid, params=params, prompt_token_ids=p)
        done = run_to_completion(self)
        return [done[rid] for rid in ids]


@dataclass
class Completion:
    """A finished request, assembled from its stream."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None


def run_to_completion(engine: LLMEngine) -> dict[str, Completion]:
    """Step until every request has finished; collect each one's stream."""
    acc: dict[str, Completion] = {}
    while engine.has_unfinished():
        for out in engine.step():
            c = acc.setdefault(out.request_id, Completion(out.request_id, [], "", None))
            c.token_ids += out.new_token_ids
            c.text += out.new_text
            if out.finished:
                c.finish_reason = out.finish_reason
    return acc
