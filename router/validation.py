"""Turn a ``GenerateRequest`` into token ids and sampling parameters, or
refuse it with :class:`~engine.sampling_params.InvalidRequestError` naming
the field. Runs in the router, before any worker sees the request.

Validation is in two steps. :func:`check_limits` measures the request
against :data:`LIMITS` (one entry per repeated or text field) in time
proportional to the number of fields, before the request counts against
``router.max_queued``; only then is it tokenized (:func:`parse_request`,
which the server runs off its event loop), so what one request can make the
router parse and tokenize is bounded.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from engine.chat_prompt import chat_prompt_ids
from engine.sampling_params import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                                    InvalidRequestError, SamplingParams)
from protos import serving_pb2
from worker_common.messages import ModelLimits

DEFAULT_MAX_TOKENS = 16
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REQUEST_ID_CHARS = 128
MAX_INPUT_CHARS = 1 << 20  # the prompt, or all chat messages' content together
MAX_CHAT_MESSAGES = 1024
MAX_PROMPT_TOKEN_IDS = 1 << 17


@dataclass(frozen=True)
class Limit:
    """The most a field of ``GenerateRequest`` may hold.

    ``field`` is spelled as in error messages; ``[]`` stands for each element
    of a repeated field (an error names the element, e.g. ``sampling.stop[2]``).
    """

    field: str
    most: int
    unit: str


# Every repeated and every text field of GenerateRequest, with its limit
# (tests check that no field is missing). Documented in docs/architecture.md, "Errors".
LIMITS = {lim.field: lim for lim in (
    Limit("request_id", MAX_REQUEST_ID_CHARS, "characters"),
    Limit("model", 256, "characters"),
    Limit("prompt", MAX_INPUT_CHARS, "characters"),
    Limit("prompt_token_ids.ids", MAX_PROMPT_TOKEN_IDS, "token ids"),
    Limit("chat.messages", MAX_CHAT_MESSAGES, "messages"),
    Limit("chat.messages[].role", 32, "characters"),
    Limit("chat.messages[].content", MAX_INPUT_CHARS, "characters in all messages together"),
    Limit("sampling.stop", MAX_STOP_STRINGS, "stop strings"),
    Limit("sampling.stop[]", MAX_STOP_STRING_CHARS, "characters"),
    Limit("sampling.stop_token_ids", MAX_STOP_TOKEN_IDS, "token ids"),
)}


def _sizes(req: serving_pb2.GenerateRequest) -> Iterator[tuple[str, str, int]]:
    """(key in LIMITS, field as reported, size) of each limited field; a list's
    length comes before its elements, so an oversized list is never walked."""
    yield "request_id", "request_id", len(req.request_id)
    yield "model", "model", len(req.model)
    yield "prompt", "prompt", len(req.prompt)
    yield "prompt_token_ids.ids", "prompt_token_ids.ids", len(req.prompt_token_ids.ids)
    messages = req.chat.messages
    yield "chat.messages", "chat.messages", len(messages)
    total = 0
    for i, m in enumerate(messages):
        yield "chat.messages[].role", f"chat.messages[{i}].role", len(m.role)
        total += len(m.content)
    yield "chat.messages[].content", "chat.messages[].content", total
    stop = req.sampling.stop
    yield "sampling.stop", "sampling.stop", len(stop)
    for i, s in enumerate(stop):
        yield "sampling.stop[]", f"sampling.stop[{i}]", len(s)
    yield "sampling.stop_token_ids", "sampling.stop_token_ids", len(req.sampling.stop_token_ids)


def check_limits(req: serving_pb2.GenerateRequest) -> None:
    """Refuse a request any field of which exceeds its :data:`LIMITS` entry
    (``InvalidRequestError`` naming the field); cheap, tokenizes nothing."""
    for key, name, size in _sizes(req):
        limit = LIMITS[key]
        if size > limit.most:
            raise InvalidRequestError(name, f"at most {limit.most} {limit.unit}, got {size}")


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Samples of the prompt (OpenAI's ``n``; the gRPC API has one): prefilled once, their
    # KV blocks shared copy-on-write; sample i samples with ``params.for_sample(i)``.
    n: int = 1


def sampling_from_proto(sp: serving_pb2.SamplingParams) -> SamplingParams:
    params = SamplingParams(
        max_tokens=sp.max_tokens if sp.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=sp.temperature if sp.HasField("temperature") else 0.0,
        top_k=sp.top_k,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        seed=sp.seed if sp.HasField("seed") else None,
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs if sp.HasField("logprobs") else None,
    )
    try:
        params.validate()
    except InvalidRequestError as e:  # name the field as the client spelled it
        raise InvalidRequestError(f"sampling.{e.field}", e.reason) from None
    return params


def parse_request(req: serving_pb2.GenerateRequest, tokenizer, limits: ModelLimits) -> ParsedRequest:
    """Validate and tokenize; raises ``InvalidRequestError`` (field + reason).
    Tokenizing costs time in proportion to the input: call it off the event loop."""
    check_limits(req)
    request_id = req.request_id or uuid.uuid4().hex
    params = sampling_from_proto(req.sampling)
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("prompt", "give a prompt or chat messages")
    if which == "prompt":
        if not req.prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        ids = tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
    elif which == "prompt_token_ids":
        ids = list(req.prompt_token_ids.ids)
        if not ids:
            raise InvalidRequestError("prompt_token_ids", "must not be empty")
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt_token_ids.ids[{bad}]",
                                      f"must be in [0, {limits.vocab_size}), got {ids[bad]}")
    else:
        messages = list(req.chat.messages)
        if not messages:
            raise InvalidRequestError("chat.messages", "must not be empty")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(f"chat.messages[{i}].role", f"must be one of {CHAT_ROLES}, got {m.role!r}")
        ids = chat_prompt_ids(tokenizer, [{"role": m.role, "content": m.content} for m in messages])
    if not ids:
        raise InvalidRequestError("prompt", "tokenizes to nothing")
    if len(ids) >= limits.max_model_len:
        raise InvalidRequestError(
            "prompt", f"{len(ids)} tokens leave no room to generate within the context of {limits.max_model_len}")
    if params.max_tokens > limits.max_model_len:
        raise InvalidRequestError("sampling.max_tokens", f"must be <= {limits.max_model_len}, got {params.max_tokens}")
    return ParsedRequest(request_id, ids, params)
