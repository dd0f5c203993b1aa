"""Seeded synthetic serving workloads with exact input and output token lengths.

Torch-free: the caller passes a Hugging Face tokenizer (for the served model,
e.g. ``engine.model_loader.load_tokenizer(name)``) and gets a list of
:class:`BenchRequest`, each holding the text to send and its exact lengths.

Workloads (``WorkloadSpec.name``):

1. ``short``: short chat-sized raw prompts (``short_input`` tokens) with short
   answers (``short_output``).
2. ``long``: long raw prompts (``long_input``), short answers (``long_output``).
3. ``mixed``: exactly ``round(long_fraction * n)`` long requests (default
   20 %), the rest short, in a seeded random order.
4. ``shared-prefix``: one common ``prefix_tokens``-token "system prompt"
   followed by a distinct ``suffix_input``-token question per request; the
   prefix's token ids are a prefix of every request's ids (checked).
5. ``multi-turn``: conversations of ``turns`` chat turns, sent as chat
   ``messages``. Turn k carries every earlier user turn and its answer; each
   turn adds ``turn_input`` tokens (the previous answer's closing tokens, the
   new user message and its template wrapping) on top of the previous prompt
   plus the previous answer. The answers in the history are synthetic texts of
   exactly the previous turn's output length (the driver can swap in the
   served answers, at the cost of exact input lengths). Turns of one
   conversation run in order: ``depends_on`` names the previous turn.

Exactness. Input lengths are counted as the router counts them: raw prompts
with ``tokenizer(text, add_special_tokens=False)``, chat requests after
``apply_chat_template(..., add_generation_prompt=True)``. Text is built from
seeded random English words, cut to a token count, then the cut is adjusted
until the count is exact (BPE is not prefix-stable, so each candidate is
re-tokenized). Output lengths are exact when the request is sent with
``max_tokens=output_tokens, ignore_eos=True``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

WORKLOADS = ("short", "long", "mixed", "shared-prefix", "multi-turn")

_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which are be have had one not but "
    "all were when we there can an your more if out so said what up its about into than them only other new some "
    "could time these two may then first any like now my such make over our even most made after also did many "
    "before must through back years where much way well down should because each just those people how too little "
    "state good very world still own see men work long here between both life being under never day same another "
    "know while last might great old year off come since against go came right used take three system request cache "
    "token model batch page block decode prefill router worker queue latency memory transfer network cluster answer "
    "question river mountain garden window library engine signal morning evening market summer winter ocean forest "
    "city village bridge station planet metal paper music letter number story energy water light sound color"
).split()

_PREFIX_INTRO = "System notes:"
_SUFFIX_LEAD = " Question:"
_MAX_FIT_TRIES = 8


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload, ready to send.

    Exactly one of ``prompt`` (raw text) and ``messages`` (chat, oldest first)
    is set. ``input_tokens`` is the exact prompt length as the router counts
    it; ``output_tokens`` the exact length to ask for (``max_tokens`` with
    ``ignore_eos``). ``depends_on`` is the index of the request that must
    finish before this one is sent (the previous turn of a conversation).
    """

    index: int
    kind: str
    input_tokens: int
    output_tokens: int
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    conversation: int | None = None
    turn: int | None = None
    depends_on: int | None = None

    def send_kwargs(self) -> dict:
        """``prompt=``/``messages=`` keyword arguments for ``AsyncClient.stream``."""
        if self.messages is not None:
            return {"messages": [dict(m) for m in self.messages]}
        return {"prompt": self.prompt}


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate; ranges are inclusive ``(low, high)`` token counts drawn uniformly."""

    name: str = "short"
    num_requests: int = 32
    seed: int = 0
    short_input: tuple[int, int] = (32, 64)
    short_output: tuple[int, int] = (16, 32)
    long_input: tuple[int, int] = (512, 512)
    long_output: tuple[int, int] = (16, 32)
    long_fraction: float = 0.2
    prefix_tokens: int = 128
    suffix_input: tuple[int, int] = (16, 48)
    turns: int = 3
    turn_input: tuple[int, int] = (32, 64)
    turn_output: tuple[int, int] = (16, 32)
    interleave: int = 4

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.name!r}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        for fname in ("short_input", "short_output", "long_input", "long_output", "suffix_input", "turn_input",
                      "turn_output"):
            lo, hi = getattr(self, fname)
            if not 1 <= lo <= hi:
                raise ValueError(f"{fname} must satisfy 1 <= low <= high, got ({lo}, {hi})")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")
        if self.prefix_tokens < 1 or self.turns < 1 or self.interleave < 1:
            raise ValueError("prefix_tokens, turns and interleave must be >= 1")


def parse_range(text: str) -> tuple[int, int]:
    """``"32:64"`` -> ``(32, 64)``; ``"512"`` -> ``(512, 512)``."""
    lo, _, hi = text.partition(":")
    pair = (int(lo), int(hi or lo))
    if not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"a length range is LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return pair


def range_arg(text: str) -> tuple[int, int]:
    """:func:`parse_range` as an ``argparse`` type (a bad range is a usage error naming the option)."""
    import argparse

    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def count_raw(tokenizer, text: str) -> int:
    """Tokens of a raw prompt, as the router counts them."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def count_chat(tokenizer, messages) -> int:
    """Tokens of a chat request after the chat template, as the router counts them."""
    text = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)
    return count_raw(tokenizer, text)


def request_tokens(tokenizer, req: BenchRequest) -> int:
    """Recount ``req``'s input tokens from its text (for checks)."""
    return count_chat(tokenizer, req.messages) if req.messages is not None else count_raw(tokenizer, req.prompt)


def filler_text(rng: random.Random, n_words: int) -> str:
    """Seeded pseudo-English: ``n_words`` words in sentences of 6-14 words."""
    out, left = [], 0
    for _ in range(n_words):
        w = rng.choice(_WORDS)
        if left == 0:
            if out:
                out[-1] += "."
            w, left = w.capitalize(), rng.randint(6, 14)
        out.append(w)
        left -= 1
    return " ".join(out)


def fit_text(tokenizer, rng: random.Random, target: int, count: Callable[[str], int] | None = None,
             lead: str = "") -> str:
    """Text ``t`` with ``count(t) == target``, cut from seeded filler words.

    ``count`` maps the variable text to the full request's token count
    (default: ``count_raw``); ``lead`` is put in front of every candidate (e.g.
    a space so that the text starts a fresh pre-token after a fixed prefix).
    Raises ``ValueError`` when no text fits (``target`` below the fixed part).
    """
    count = count or (lambda t: count_raw(tokenizer, t))
    base = count("")
    if target <= base:
        raise ValueError(f"cannot fit {target} tokens: the fixed part alone is {base} tokens")
    for _ in range(_MAX_FIT_TRIES):
        need = target - base
        ids = tokenizer(filler_text(rng, 2 * need + 16), add_special_tokens=False)["input_ids"]
        k, seen = min(need, len(ids)), set()
        while 1 <= k <= len(ids) and k not in seen:
            seen.add(k)
            text = lead + tokenizer.decode(ids[:k]).strip()
            c = count(text)
            if c == target:
                return text
            k += target - c
        # Merges across the cut oscillate around the target: draw other words.
    raise ValueError(f"could not fit a text of exactly {target} tokens after {_MAX_FIT_TRIES} draws")


def _draw(rng: random.Random, rng_range: tuple[int, int]) -> int:
    return rng.randint(*rng_range)


def _single(tokenizer, rng: random.Random, index: int, kind: str, n_in: int, n_out: int) -> BenchRequest:
    prompt = fit_text(tokenizer, rng, n_in)
    return BenchRequest(index, kind, count_raw(tokenizer, prompt), n_out, prompt=prompt)


def _shared_prefix(spec: WorkloadSpec, tokenizer, rng: random.Random) -> list[BenchRequest]:
    # The prefix ends on a punctuation mark and each suffix starts with a space,
    # so BPE pre-tokenization splits there and the prefix ids stay a prefix.
    body = fit_text(tokenizer, rng, spec.prefix_tokens,
                    count=lambda t: count_raw(tokenizer, _PREFIX_INTRO + " " + t + "." + _SUFFIX_LEAD))
    prefix = _PREFIX_INTRO + " " + body + "." + _SUFFIX_LEAD
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(spec.num_requests):
        n_in = spec.prefix_tokens + _draw(rng, spec.suffix_input)
        suffix = fit_text(tokenizer, rng, n_in, count=lambda t: count_raw(tokenizer, prefix + t), lead=" ")
        ids = tokenizer(prefix + suffix, add_special_tokens=False)["input_ids"]
        if ids[:len(prefix_ids)] != prefix_ids:
            raise ValueError("the shared prefix does not tokenize as a prefix of the request (tokenizer merges across it)")
        out.append(BenchRequest(i, "shared-prefix", len(ids), _draw(rng, spec.short_output), prompt=prefix + suffix))
    return out


def _multi_turn(spec: WorkloadSpec, tokenizer, rng: random.Random) -> list[BenchRequest]:
    n_conv = -(-spec.num_requests // spec.turns)
    convs: list[list[BenchRequest]] = []
    made = 0
    for c in range(n_conv):
        history: list[dict] = []
        turns, target, prev_out = [], 0, 0
        for t in range(min(spec.turns, spec.num_requests - made)):
            target += prev_out + _draw(rng, spec.turn_input)
            n_out = _draw(rng, spec.turn_output)
            user = fit_text(tokenizer, rng, target,
                            count=lambda x: count_chat(tokenizer, history + [{"role": "user", "content": x}]))
            messages = tuple(history + [{"role": "user", "content": user}])
            turns.append(BenchRequest(-1, "multi-turn", count_chat(tokenizer, messages), n_out, messages=messages,
                                      conversation=c, turn=t))
            # A stand-in answer of exactly the requested output length.
            history = list(messages) + [{"role": "assistant", "content": fit_text(tokenizer, rng, n_out)}]
            prev_out = n_out
            made += 1
        convs.append(turns)
    # Interleave `interleave` conversations at a time, turn by turn, so that a
    # conversation's next turn is queued behind other conversations' turns.
    ordered: list[BenchRequest] = []
    where: dict[tuple[int, int], int] = {}
    for g in range(0, len(convs), spec.interleave):
        group = convs[g:g + spec.interleave]
        for t in range(spec.turns):
            for turns in group:
                if t < len(turns):
                    r = turns[t]
                    idx = len(ordered)
                    where[(r.conversation, t)] = idx
                    dep = where[(r.conversation, t - 1)] if t else None
                    ordered.append(BenchRequest(idx, r.kind, r.input_tokens, r.output_tokens, messages=r.messages,
                                                conversation=r.conversation, turn=t, depends_on=dep))
    return ordered


def generate(spec: WorkloadSpec, tokenizer) -> list[BenchRequest]:
    """The requests of ``spec``, reproducible from ``spec.seed``, with exact lengths for ``tokenizer``."""
    rng = random.Random(spec.seed)
    n = spec.num_requests
    if spec.name == "shared-prefix":
        return _shared_prefix(spec, tokenizer, rng)
    if spec.name == "multi-turn":
        return _multi_turn(spec, tokenizer, rng)
    if spec.name == "short":
        kinds = ["short"] * n
    elif spec.name == "long":
        kinds = ["long"] * n
    else:
        n_long = round(spec.long_fraction * n)
        kinds = ["long"] * n_long + ["short"] * (n - n_long)
        rng.shuffle(kinds)
    out = []
    for i, kind in enumerate(kinds):
        n_in = _draw(rng, spec.long_input if kind == "long" else spec.short_input)
        n_out = _draw(rng, spec.long_output if kind == "long" else spec.short_output)
        out.append(_single(tokenizer, rng, i, kind, n_in, n_out))
    return out


def describe(requests: list[BenchRequest]) -> dict:
    """Counts and length ranges of a workload, for reports."""
    ins = [r.input_tokens for r in requests]
    outs = [r.output_tokens for r in requests]
    kinds: dict[str, int] = {}
    for r in requests:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return {
        "num_requests": len(requests),
        "kinds": kinds,
        "input_tokens": {"min": min(ins), "mean": sum(ins) / len(ins), "max": max(ins), "total": sum(ins)},
        "output_tokens": {"min": min(outs), "mean": sum(outs) / len(outs), "max": max(outs), "total": sum(outs)},
        "conversations": len({r.conversation for r in requests if r.conversation is not None}),
    }
