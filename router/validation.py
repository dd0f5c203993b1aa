"""Turn a ``GenerateRequest`` into token ids and sampling parameters, or
refuse it with :class:`~engine.sampling_params.InvalidRequestError` naming
the field. Runs in the router, before any worker sees the request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from engine.sampling_params import InvalidRequestError, SamplingParams
from protos import serving_pb2
from worker_common.messages import ModelLimits

DEFAULT_MAX_TOKENS = 16
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


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
    )
    try:
        params.validate()
    except InvalidRequestError as e:  # name the field as the client spelled it
        raise InvalidRequestError(f"sampling.{e.field}", e.reason) from None
    return params


def parse_request(req: serving_pb2.GenerateRequest, tokenizer, limits: ModelLimits) -> ParsedRequest:
    """Validate and tokenize; raises ``InvalidRequestError`` (field + reason)."""
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    request_id = req.request_id or uuid.uuid4().hex
    params = sampling_from_proto(req.sampling)
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidRequestError("prompt", "give a prompt or chat messages")
    if which == "prompt":
        if not req.prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        ids = tokenizer(req.prompt, add_special_tokens=False)["input_ids"]
    else:
        messages = list(req.chat.messages)
        if not messages:
            raise InvalidRequestError("chat.messages", "must not be empty")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(f"chat.messages[{i}].role", f"must be one of {CHAT_ROLES}, got {m.role!r}")
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidRequestError("prompt", "tokenizes to nothing")
    if len(ids) >= limits.max_model_len:
        raise InvalidRequestError(
            "prompt", f"{len(ids)} tokens leave no room to generate within the context of {limits.max_model_len}")
    if params.max_tokens > limits.max_model_len:
        raise InvalidRequestError("sampling.max_tokens", f"must be <= {limits.max_model_len}, got {params.max_tokens}")
    return ParsedRequest(request_id, ids, params)
