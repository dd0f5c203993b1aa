"""The OpenAI API's request and response shapes: the one place their field names live.

:func:`parse_completions` / :func:`parse_chat` turn a decoded JSON body into
an :class:`OpenAIRequest` (the ``GenerateRequest`` of each prompt, plus what
shapes the answer), refusing a bad parameter with
:class:`~engine.sampling_params.InvalidRequestError` named as OpenAI spells
it (``messages[1].content``, ``top_logprobs``). Unknown fields are ignored,
as OpenAI does; known fields this server does not implement (``tools``,
``response_format``, ``logit_bias``, ``echo``, ...) are refused by name
unless they hold their no-op value. The builders below produce responses,
stream chunks and error bodies field for field as OpenAI's, plus two
extensions: ``splitserve_timings`` (the request's stage timings, the gRPC
``Timings`` message as JSON) on each finished choice, and ``token_ids`` on
each choice when the request set ``return_token_ids`` (as vLLM names it).

Torch-free; knows nothing of HTTP.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.sampling_params import MAX_LOGPROBS, InvalidRequestError
from protos import serving_pb2

if TYPE_CHECKING:  # only a type here: importing it would import torch
    from engine.sampler import TokenLogprob

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one completions request (a list)
TIMINGS_FIELD = "splitserve_timings"
# Known OpenAI fields this server does not implement, with the values that
# mean "not used" (those are accepted). Anything else in them is a 400.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "min_tokens": (None, 0), "repetition_penalty": (None, 1, 1.0), "use_beam_search": (None, False),
}
EXTENSIONS = ("top_k", "ignore_eos", "return_token_ids")  # accepted beyond OpenAI's own fields


@dataclass(frozen=True)
class OpenAIRequest:
    """One OpenAI request: a ``GenerateRequest`` per prompt, each run ``n`` times."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: tuple[serving_pb2.GenerateRequest, ...]
    n: int = 1
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; k: the token's and k alternatives
    return_token_ids: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def choice(self, prompt_index: int, sample: int) -> int:
        """The choice index of sample ``sample`` of prompt ``prompt_index`` (OpenAI's order)."""
        return prompt_index * self.n + sample

    def sample_seed(self, sample: int) -> int | None:
        """The seed of sample ``sample``: the request's seed plus the sample's index, so
        each of the n samples differs and the whole answer is reproducible."""
        return None if self.seed is None else self.seed + sample

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id


# ------------------------------------------------------------------ parsing
def _bad(param: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(param, reason)


def _typed(body: dict, name: str, kinds: tuple[type, ...], what: str, check: Callable[[Any], bool] | None = None,
           rule: str = "") -> Any:
    """``body[name]`` if present and not null, of one of ``kinds`` (never a bool for a number), else None."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _bad(name, f"must be {what}, got {type(value).__name__}")
    if check is not None and not check(value):
        raise _bad(name, f"must be {rule}, got {value!r}")
    return value


def _int(body: dict, name: str, check=None, rule: str = "") -> int | None:
    return _typed(body, name, (int,), "an integer", check, rule)


def _number(body: dict, name: str, check=None, rule: str = "") -> float | None:
    value = _typed(body, name, (int, float), "a number", check, rule)
    return None if value is None else float(value)


def _flag(body: dict, name: str) -> bool:
    return bool(_typed(body, name, (bool,), "a boolean"))


def _refuse_unsupported(body: dict) -> None:
    for name, noop in UNSUPPORTED.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) or body[name] is v
                                    for v in noop):
            raise _bad(name, "is not supported by this server")


def _sampling(body: dict, *, max_tokens_names: tuple[str, ...], default_max_tokens: int | None,
              logprobs: int | None) -> serving_pb2.SamplingParams:
    sp = serving_pb2.SamplingParams()
    for name in max_tokens_names:
        if (value := _int(body, name, lambda v: v >= 1, "an integer >= 1")) is not None:
            sp.max_tokens = value
            break
    else:
        if default_max_tokens is not None:
            sp.max_tokens = default_max_tokens
    # OpenAI's default temperature is 1 (sampled); 0 is greedy.
    temperature = _number(body, "temperature", lambda v: v >= 0, "a number >= 0")
    sp.temperature = 1.0 if temperature is None else temperature
    if (top_p := _number(body, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")) is not None:
        sp.top_p = top_p
    top_k = _int(body, "top_k", lambda v: v >= -1, "an integer >= -1 (-1 or 0: off)")
    sp.top_k = max(top_k or 0, 0)
    if (seed := _int(body, "seed", lambda v: -(1 << 63) <= v < (1 << 63), "a 64-bit integer")) is not None:
        sp.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", "must be a string or a list of strings")
        sp.stop.extend(stop)
    sp.ignore_eos = _flag(body, "ignore_eos")
    if logprobs is not None:
        sp.logprobs = logprobs
    return sp


def _common(body: dict) -> dict:
    """The fields both endpoints share."""
    if not isinstance(body, dict):
        raise _bad("body", "must be a JSON object")
    _refuse_unsupported(body)
    model = _typed(body, "model", (str,), "a string") or ""
    n = _int(body, "n", lambda v: 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]") or 1
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "is only allowed when stream is true")
        if not isinstance(options, dict):
            raise _bad("stream_options", "must be an object")
        include_usage = bool(_typed(options, "include_usage", (bool,), "a boolean"))
    return dict(model=model, n=n, stream=stream, include_usage=include_usage,
                seed=_int(body, "seed"), return_token_ids=_flag(body, "return_token_ids"))


def parse_completions(body: Any, default_max_tokens: int) -> OpenAIRequest:
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of
    token ids or a list of lists of token ids."""
    common = _common(body)
    logprobs = _int(body, "logprobs", lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
    sp = _sampling(body, max_tokens_names=("max_tokens",), default_max_tokens=default_max_tokens, logprobs=logprobs)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of them "
                             "(not empty)")
    if len(prompts) > MAX_PROMPTS:
        raise _bad("prompt", f"at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    requests = []
    for i, p in enumerate(prompts):
        req = serving_pb2.GenerateRequest(model=common["model"], sampling=sp)
        if isinstance(p, str):
            req.prompt = p
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            req.prompt_token_ids.ids.extend(p)
            req.prompt_token_ids.SetInParent()
        else:
            raise _bad(f"prompt[{i}]", "must be a string or a list of token ids")
        requests.append(req)
    return OpenAIRequest("completion", prompts=tuple(requests), logprobs=logprobs, **common)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}]", "only parts of type 'text' are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")


def parse_chat(body: Any, default_max_tokens: int | None) -> OpenAIRequest:
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template."""
    common = _common(body)
    logprobs = None
    if _flag(body, "logprobs"):
        logprobs = _int(body, "top_logprobs", lambda v: 0 <= v <= MAX_LOGPROBS,
                        f"an integer in [0, {MAX_LOGPROBS}]") or 0
    elif body.get("top_logprobs") is not None:
        raise _bad("top_logprobs", "needs logprobs: true")
    sp = _sampling(body, max_tokens_names=("max_completion_tokens", "max_tokens"),
                   default_max_tokens=default_max_tokens, logprobs=logprobs)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    req = serving_pb2.GenerateRequest(model=common["model"], sampling=sp)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role", "must be a string")
        if m.get("tool_calls"):
            raise _bad(f"messages[{i}].tool_calls", "is not supported by this server")
        req.chat.messages.add(role=role, content=_content(m, i))
    return OpenAIRequest("chat", prompts=(req,), logprobs=logprobs, **common)


def openai_param(field_name: str) -> str:
    """A field of ``GenerateRequest`` (as the router's validation names it) as the OpenAI request spells it."""
    for ours, theirs in (("sampling.max_tokens", "max_tokens"), ("sampling.", ""), ("chat.messages", "messages"),
                         ("prompt_token_ids.ids", "prompt"), ("prompt_token_ids", "prompt")):
        if field_name.startswith(ours):
            return theirs + field_name[len(ours):]
    return field_name


# ---------------------------------------------------------------- responses
@dataclass
class ChoiceState:
    """What one choice has produced so far (a non-streamed answer is built from it)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    timings: dict | None = None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion_logprobs(lps: list[TokenLogprob], token_text: Callable[[int], str], offset: int) -> dict:
    tokens = [token_text(lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def _chat_logprobs(lps: list[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def choice_logprobs(req: OpenAIRequest, lps: list[TokenLogprob], token_text: Callable[[int], str],
                    text_offset: int = 0) -> dict | None:
    if req.logprobs is None:
        return None
    return _chat_logprobs(lps, token_text) if req.kind == "chat" else _completion_logprobs(lps, token_text, text_offset)


def _choice(req: OpenAIRequest, index: int, text: str, token_ids: list[int], lps: dict | None,
            finish_reason: str | None, timings: dict | None, *, delta: dict | None = None) -> dict:
    if req.kind == "chat":
        body: dict = {"index": index}
        if delta is not None:
            body["delta"] = delta
        else:
            body["message"] = {"role": "assistant", "content": text}
        body.update(logprobs=lps, finish_reason=finish_reason)
    else:
        body = {"index": index, "text": text, "logprobs": lps, "finish_reason": finish_reason}
    if req.return_token_ids:
        body["token_ids"] = token_ids
    if timings is not None:
        body[TIMINGS_FIELD] = timings
    return body


def full_response(req: OpenAIRequest, created: int, model: str, choices: list[ChoiceState],
                  prompt_tokens: int, token_text: Callable[[int], str]) -> dict:
    """The non-streamed answer."""
    return {
        "id": req.response_id, "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": created, "model": model, "system_fingerprint": None,
        "choices": [_choice(req, i, c.text, c.token_ids, choice_logprobs(req, c.logprobs, token_text),
                            c.finish_reason, c.timings) for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices)),
    }


def stream_chunk(req: OpenAIRequest, created: int, model: str, index: int, text: str, token_ids: list[int],
                 lps: dict | None, finish_reason: str | None, timings: dict | None, *, first: bool = False) -> dict:
    """One streamed chunk of one choice; a chat choice's first chunk carries the role."""
    delta = None
    if req.kind == "chat":
        delta = {"role": "assistant", "content": text} if first else {"content": text}
    chunk = {"id": req.response_id, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
             "created": created, "model": model, "system_fingerprint": None,
             "choices": [_choice(req, index, text, token_ids, lps, finish_reason, timings, delta=delta)]}
    if req.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(req: OpenAIRequest, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": req.response_id, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def models_response(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "splitserve"}]}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
