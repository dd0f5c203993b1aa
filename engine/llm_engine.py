"""The engine: requests in, token streams out, one ``step()`` at a time.

A step reads as schedule → run → postprocess:

1. the :class:`~engine.scheduler.Scheduler` picks tokens to compute (new
   requests join between steps, finished ones have already left);
2. the :class:`~engine.model_runner.ModelRunner` runs them through the model
   over the paged KV cache and returns logits where a token is due;
3. postprocessing samples, detokenizes incrementally, applies stop
   conditions, and frees the blocks of every finished sequence at once.

A request may ask for ``n`` samples: its prompt is prefilled once, then
(when the prompt's logits are there) it forks into ``n`` sequences that share
the prompt's KV blocks by reference count, the partly filled last block
copy-on-write (:meth:`KVCacheManager.fork`). Sample ``i`` runs under
:func:`~engine.sequence.sample_request_id` and draws from the same prompt
logits with its own seed (``seed + i``, or a fresh random one), so it is
exactly what a lone request with that seed would produce. Each sample then
lives on its own: it finishes, is cancelled or preempted alone, freeing only
its own references. Forks join the running batch directly, so a batch may
exceed ``max_running`` by up to ``n - 1`` (the KV pool, not that cap, bounds them).

A request may ask to stop after prefill (``export_after_prefill``): its
first token is sampled, its blocks are kept, and :meth:`LLMEngine.export_kv`
hands its KV to another engine, which continues with :meth:`import_kv`.

Prefix caching (``prefix_caching``, on by default): every full block of
computed KV is cached under a chained hash of its tokens and the engine's
``kv_cache_key`` (:mod:`engine.kv_cache_manager`), including blocks written
by :meth:`LLMEngine.import_kv`, and stays cached after its request ends
until the space is needed. A new request, a preempted one coming back, a
reservation and an import all start with the leading blocks already cached.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace

import torch

from analysis.cost_model import ModelDims, dtype_bytes
from analysis.machine_peaks import MachinePeaks
from engine.chat_prompt import chat_prompt_ids
from engine.detokenizer import IncrementalDetokenizer
from engine.format_cost import FormatCost
from engine.kv_cache import PagedKVCache
from engine.kv_cache import KVLayout
from engine.kv_cache_manager import KVCacheManager, blocks_needed
from engine.kv_handoff import KVHandoff, KVLayoutMismatchError, SampleStart
from engine.model_loader import LoadedModel
from engine.model_runner import ModelRunner
from engine.sampler import SamplingError, TokenLogprob, sample, token_logprobs
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus, sample_request_id
from engine.step_stats import StepStats, StepStatsSnapshot

DEFAULT_NUM_BLOCKS = 1024


def default_kv_cache_key(model_name: str, weight_format: str, layout: KVLayout) -> str:
    """The prefix cache's KV-compatibility key: the model's name, its weight
    format (dtype and quantization: different weights write different KV) and
    the KV layout (layers, KV heads, head dim, dtype). An engine whose KV
    differs in any other way passes its own ``kv_cache_key``, so no block is
    shared across formats."""
    return f"{model_name}|{weight_format}|{layout.num_layers}x{layout.num_kv_heads}x{layout.head_dim}|{layout.dtype}"


@dataclass(frozen=True)
class Reservation:
    """Blocks held for a KV that will be imported (:meth:`LLMEngine.reserve`);
    the first ``cached_tokens`` tokens' KV is already here (prefix cache), so
    only the rest needs to come."""

    request_id: str
    num_tokens: int
    cached_tokens: int = 0


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
    num_cached_tokens: int = 0  # with ``timestamps``: tokens this engine found in its prefix cache for it
    error: str | None = None  # with finish_reason "error": why this request (alone) failed
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request's params ask for them


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    seed: int
    pending_text: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()  # the params' ids as a set: checked once per token
    forks: list[tuple[str, int]] = field(default_factory=list)  # (id, seed) of samples to fork once the prompt is in

    @classmethod
    def of(cls, seq: Sequence, detok: IncrementalDetokenizer, seed: int) -> _Request:
        return cls(seq, detok, seed, stop_token_ids=frozenset(seq.params.stop_token_ids))


class LLMEngine:
    """Continuous-batching generation over a paged KV cache.

    ``num_blocks`` or ``kv_cache_bytes`` (not both) sizes the cache;
    ``max_batched_tokens`` is the per-step token budget (longer prompts are
    prefilled in chunks); ``max_running`` caps the running batch.
    ``prefix_caching`` keeps and reuses full blocks (module docstring);
    ``kv_cache_key`` names the KV format for it (default:
    :func:`default_kv_cache_key`). ``compile`` runs decode-only steps through a
    graph compiled once per batch bucket (:mod:`engine.compiled_decode`; CPU only).
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
        prefix_caching: bool = True,
        kv_cache_key: str | None = None,
        compile: bool = False,
    ) -> None:
        if num_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("give num_blocks or kv_cache_bytes, not both")
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_model_len = model.max_model_len
        self.layout = model.kv_layout
        if kv_cache_bytes is not None:
            num_blocks = PagedKVCache.num_blocks_for_budget(self.layout, block_size, kv_cache_bytes)
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_bytes={kv_cache_bytes} holds no block of "
                    f"{PagedKVCache.bytes_per_block(self.layout, block_size)} bytes"
                )
        num_blocks = DEFAULT_NUM_BLOCKS if num_blocks is None else num_blocks
        self.kv_cache_key = kv_cache_key or default_kv_cache_key(model.name, model.fmt.label, self.layout)
        self.kv = KVCacheManager(num_blocks, block_size, enable_caching=prefix_caching, cache_key=self.kv_cache_key)
        self.cache = PagedKVCache(self.layout, num_blocks, block_size)
        self.runner = ModelRunner(model.weights, self.cache, compile_decode=compile)
        if self.runner.compiled is not None:
            self.runner.compiled.warm_up()  # compile now, before any request can wait for it
        self.scheduler = Scheduler(self.kv, max_running, max_batched_tokens)
        self._requests: dict[str, _Request] = {}
        self._parked: dict[str, _Request] = {}
        self._reserved: dict[str, Reservation] = {}
        self._unforked: dict[str, str] = {}  # id of a sample not forked yet -> the request that will fork it
        self.num_forks = 0  # samples forked from a prefilled prompt (each saved one prefill)
        self._arrivals = 0
        self.num_steps = 0
        # Per-step time, batch, tokens, modelled bytes/FLOPs; MBU/MFU against ``peaks``.
        # Weight bytes as the format holds them (int8/int4 read far fewer than ModelDims' dtype count).
        self.step_accounting = StepStats(FormatCost(ModelDims.from_hf_config(model.config), model.weights),
                                         dtype_bytes(self.layout.dtype), peaks)

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
        n: int = 1,
    ) -> None:
        """Queue a request; raises :class:`InvalidRequestError` (naming the field) before any state changes.

        ``n`` > 1: ``n`` samples of the prompt, prefilled once (module
        docstring); their ids are ``sample_request_id(request_id, i)``.

        ``output_token_ids`` resumes a request whose first outputs were
        produced elsewhere (a worker that died): they are recomputed with the
        prompt, count towards ``max_tokens`` and are not streamed again;
        ``emitted_text`` is the text already streamed for them.
        """
        params = params or SamplingParams()
        params.validate()
        if request_id in self._requests or request_id in self._parked or request_id in self._unforked:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        if not isinstance(n, int) or n < 1:
            raise InvalidRequestError("n", f"must be an integer >= 1, got {n!r}")
        if n > 1 and (output_token_ids or emitted_text):
            raise InvalidRequestError("n", "a resumed request (output_token_ids) has one sample")
        fork_ids = [sample_request_id(request_id, i) for i in range(1, n)]
        for fid in fork_ids:
            if self._in_use(fid):
                raise InvalidRequestError("request_id", f"{fid!r} is already in use")
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
        req = self._requests[request_id] = _Request.of(seq, detok, seed)
        req.forks = [(fid, self._sample_seed(params, i)) for i, fid in enumerate(fork_ids, start=1)]
        for fid in fork_ids:
            self._unforked[fid] = request_id
        self.scheduler.add(seq)

    @staticmethod
    def _sample_seed(params: SamplingParams, index: int) -> int:
        """Sample ``index``'s seed: the request's seed plus the index (a lone request with that
        seed draws the same tokens), or a fresh random one."""
        return params.seed + index if params.seed is not None else random.getrandbits(63)

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
        parent = self._unforked.pop(request_id, None)
        if parent is not None:  # a sample not forked yet: it never will be
            owner = self._requests.get(parent)
            if owner is not None:
                owner.forks = [f for f in owner.forks if f[0] != request_id]
            return True
        req = self._requests.pop(request_id, None) or self._parked.pop(request_id, None)
        if req is None:
            return False
        for fid, _ in req.forks:  # the prompt is gone: so are the samples it would have forked
            self._unforked.pop(fid, None)
        req.forks = []
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
        self.cache.copy_blocks(self.kv.take_copies())  # forks' copies on write, before this step writes
        sampled_chunks, logits = self.runner.execute(plan.chunks, self.kv)
        bs = self.kv.block_size
        for c in plan.chunks:
            end = c.num_tokens + c.start
            c.seq.num_computed_tokens = end
            if end // bs > c.start // bs:  # a block filled up: cache it
                self.kv.commit(c.seq.request_id, c.seq.token_ids, end)
        self.num_steps += 1
        reqs = [self._requests[c.seq.request_id] for c in sampled_chunks]
        rows = list(range(len(reqs)))
        for k in range(len(reqs)):
            forked = self._fork(reqs[k])
            reqs += forked
            rows += [k] * len(forked)  # every sample draws from its prompt's logits
        if len(rows) > logits.shape[0]:
            logits = logits[rows]
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

    def _fork(self, req: _Request) -> list[_Request]:
        """Fork ``req``'s pending samples now that its prompt is computed: each shares its blocks
        (copy-on-write for the last, partly filled one) and joins the running batch."""
        if not req.forks:
            return []
        parent = req.seq
        out = []
        for fid, seed in req.forks:
            del self._unforked[fid]
            self.kv.fork(parent.request_id, fid, parent.num_computed_tokens)
            params = self._sample_params(parent.params, seed)
            seq = Sequence(fid, list(parent.prompt_token_ids), params, arrival=self._arrivals,
                           num_computed_tokens=parent.num_computed_tokens, status=SequenceStatus.RUNNING,
                           export_after_prefill=parent.export_after_prefill,
                           num_cached_tokens=parent.num_cached_tokens, timestamps=dict(parent.timestamps))
            self._arrivals += 1
            child = self._requests[fid] = _Request.of(
                seq, IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop), seed)
            self.scheduler.running.append(seq)
            out.append(child)
        self.num_forks += len(out)
        req.forks = []
        return out

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
            out.num_cached_tokens = seq.num_cached_tokens or 0
        if status is not None:
            # Its partly filled last block too: a conversation's next turn continues these tokens.
            self.kv.cache_tail(seq.request_id, seq.token_ids, seq.num_computed_tokens)
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
    def export_kv(self, request_id: str, start: int = 0) -> KVHandoff:
        """Copy a parked request's KV out, from position ``start`` on (the
        receiver caches the rest); its blocks stay held until :meth:`release`."""
        req = self._parked[request_id]
        seq = req.seq
        if not 0 <= start < seq.num_computed_tokens:
            raise ValueError(f"export start {start} is outside the {seq.num_computed_tokens} computed tokens")
        slots = torch.tensor([self.kv.slot(request_id, p) for p in range(start, seq.num_computed_tokens)],
                             dtype=torch.long)
        data = self.cache.read_tokens(slots)
        return KVHandoff(request_id, self.layout, list(seq.prompt_token_ids), list(seq.output_token_ids), req.seed, data,
                         start)

    def seed_of(self, request_id: str) -> int:
        """The seed a running or parked request samples with (a drawn one when its params have none)."""
        req = self._requests.get(request_id) or self._parked[request_id]
        return req.seed

    def release(self, request_id: str) -> None:
        """Free a parked request's blocks (after the receiver acknowledged its KV); the prompt's
        partly filled last block stays cached with the full ones."""
        req = self._parked.pop(request_id)
        self.kv.cache_tail(request_id, req.seq.token_ids, req.seq.num_computed_tokens)
        self.kv.free(request_id)

    def reserve(self, request_id: str, num_tokens: int, token_ids: list[int] | None = None,
                max_cached_tokens: int | None = None, n: int = 1) -> Reservation | None:
        """Hold blocks for ``num_tokens`` tokens of a request that will be imported.

        ``token_ids`` (the tokens whose KV will come, as far as known): start
        with their leading cached blocks (at most ``max_cached_tokens``
        tokens; by default all but the last token), so only the rest has to
        be sent; the reservation says how many are cached. Counts against
        ``max_running``; ``None`` when there is no room now. ``n`` > 1: the KV
        will be shared by ``n`` samples (``import_kv(..., samples=)``): the
        blocks are held once, plus one spare block per other sample for its
        copy on write, so what is admitted is what the samples will take.
        """
        if self._in_use(request_id):
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        if len(self.scheduler.running) + len(self._reserved) >= self.scheduler.max_running:
            return None
        prefix = self.kv.match_prefix(token_ids, max_cached_tokens) if token_ids else None
        if not self.kv.allocate_slots(request_id, num_tokens, prefix):
            return None
        if n > 1 and not self.kv.hold_spares(request_id, n - 1):
            self.kv.free(request_id)
            return None
        cached = prefix.num_tokens if prefix else 0
        if token_ids:
            self.kv.record_lookup(len(token_ids), cached)
        self._reserved[request_id] = Reservation(request_id, num_tokens, cached)
        return self._reserved[request_id]

    def cancel_reservation(self, request_id: str) -> bool:
        """Free a reservation that will not be imported (lease expired, transfer failed)."""
        if self._reserved.pop(request_id, None) is None:
            return False
        self.kv.free(request_id)
        return True

    def _in_use(self, request_id: str) -> bool:
        return (request_id in self._requests or request_id in self._parked or request_id in self._reserved
                or request_id in self._unforked)

    def import_kv(self, handoff: KVHandoff, params: SamplingParams, request_id: str | None = None,
                  emitted_text: str | None = None, samples: tuple[SampleStart, ...] = ()) -> bool:
        """Continue decoding a request prefilled elsewhere.

        Uses the blocks of a :meth:`reserve` made under ``request_id`` if
        there is one. Returns ``False`` when there is no room now (blocks or
        running slots); raises :class:`KVLayoutMismatchError` when the KV was
        computed with another layout. Tokens already in the hand-off are not
        streamed again; ``emitted_text`` (the text the sender already
        streamed for them, when it held some back for stop strings) keeps the
        text stream seamless.

        A hand-off that starts at ``start`` > 0 needs the first ``start``
        tokens' KV here already: in the reservation's cached blocks, or (no
        reservation) in the prefix cache; else ``ValueError``. Only positions
        past what is cached here are written (a cached block is shared and
        never written); the imported full blocks join the prefix cache.

        ``samples`` (a request with ``n`` > 1 whose first tokens were drawn
        where it was prefilled; the hand-off then covers the prompt): the KV is
        written once, for the first of them, and the others fork from it
        (module docstring); each runs as ``sample_request_id(request_id, index)``.
        """
        if samples:
            return self._import_samples(handoff, params, request_id or handoff.request_id, samples)
        diffs = self.layout.mismatches(handoff.layout)
        if diffs:
            raise KVLayoutMismatchError("KV layout mismatch (theirs != ours): " + "; ".join(diffs))
        params.validate()
        request_id = request_id or handoff.request_id
        reservation = self._reserved.get(request_id)
        if request_id in self._requests or request_id in self._parked:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        self._check_prompt(handoff.prompt_token_ids, params)
        seq = Sequence(request_id, list(handoff.prompt_token_ids), params, arrival=self._arrivals,
                       output_token_ids=list(handoff.output_token_ids), num_computed_tokens=handoff.end)
        if seq.num_uncomputed_tokens != 1:
            raise ValueError(f"hand-off covers {handoff.end} of {seq.num_tokens} tokens; expected all but the last")
        if reservation is None:
            if len(self.scheduler.running) + len(self._reserved) >= self.scheduler.max_running:
                return False
            prefix = self.kv.match_prefix(seq.token_ids, handoff.end)
            cached = prefix.num_tokens
        else:
            prefix, cached = None, reservation.cached_tokens
        if cached < handoff.start:
            raise ValueError(f"hand-off starts at token {handoff.start} but only {cached} tokens are cached here")
        if not self.kv.allocate_slots(request_id, seq.num_tokens, prefix):
            return False
        self._reserved.pop(request_id, None)
        slots = torch.tensor([self.kv.slot(request_id, p) for p in range(cached, handoff.end)], dtype=torch.long)
        self.cache.write_tokens(slots, handoff.data[:, :, cached - handoff.start:])
        self.kv.commit(request_id, seq.token_ids, handoff.end)
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

    def _import_samples(self, handoff: KVHandoff, params: SamplingParams, request_id: str,
                        samples: tuple[SampleStart, ...]) -> bool:
        first, rest = samples[0], samples[1:]
        lead = sample_request_id(request_id, first.index)
        if lead != request_id and request_id in self._reserved:  # the reservation passes to the first live sample
            if self._in_use(lead):
                raise InvalidRequestError("request_id", f"{lead!r} is already in use")
            self.kv.rename(request_id, lead)
            self._reserved[lead] = replace(self._reserved.pop(request_id), request_id=lead)
        for s in rest:
            if self._in_use(sample_request_id(request_id, s.index)):
                raise InvalidRequestError("request_id", f"{sample_request_id(request_id, s.index)!r} is already in use")
        one = KVHandoff(lead, handoff.layout, list(handoff.prompt_token_ids), [first.token_id], first.seed,
                        handoff.data, handoff.start)
        if not self.import_kv(one, self._sample_params(params, first.seed), lead, first.text):
            return False
        parent = self._requests[lead].seq
        for s in rest:
            sid = sample_request_id(request_id, s.index)
            self.kv.fork(lead, sid, parent.num_computed_tokens)
            sp = self._sample_params(params, s.seed)
            seq = Sequence(sid, list(parent.prompt_token_ids), sp, arrival=self._arrivals, output_token_ids=[s.token_id],
                           num_computed_tokens=parent.num_computed_tokens, status=SequenceStatus.RUNNING)
            self._arrivals += 1
            detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, sp.stop)
            detok.skip_token(s.token_id)
            detok.mark_emitted(len(s.text))
            self._requests[sid] = _Request.of(seq, detok, s.seed)
            self.scheduler.running.append(seq)
        self.num_forks += len(rest)
        return True

    @staticmethod
    def _sample_params(params: SamplingParams, seed: int) -> SamplingParams:
        return replace(params, seed=seed) if params.seed is not None else params

    # ------------------------------------------------------------ utilities
    def stats(self) -> dict[str, int]:
        """Occupancy and counters. Cached blocks no request holds count as
        free (``cached_blocks`` says how many of the free ones hold a cached
        prefix), so once every request has ended ``free_blocks == num_blocks``."""
        cache = self.kv.cache_stats()
        return {
            "num_blocks": self.kv.num_blocks,
            "free_blocks": self.kv.num_free_blocks,
            "used_blocks": self.kv.num_blocks - self.kv.num_free_blocks,
            "cached_blocks": cache.cached_blocks,
            "prefix_queried_tokens": cache.queried_tokens,
            "prefix_hit_tokens": cache.hit_tokens,
            "cache_evictions": cache.evictions,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "parked": len(self._parked),
            "reserved": len(self._reserved),
            "preemptions": self.scheduler.num_preemptions,
            "forks": self.num_forks,
        }

    def cached_block_hashes(self, limit: int) -> tuple[int, ...]:
        """Up to ``limit`` hashes of the blocks in the prefix cache, most recently used first
        (what a worker publishes for prefix-aware routing)."""
        return self.kv.cached_hashes(limit)

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
