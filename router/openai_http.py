"""The OpenAI-compatible HTTP front door (``router.http_port``), beside the gRPC API.

An ``aiohttp`` server on the router's own event loop: each request goes
through the same :class:`~router.lifecycle.RequestLifecycle` as a gRPC
``Generate`` (same validation and ``LIMITS``, same ``router.max_queued``,
same runner, deadline, metrics), not through a proxy hop. Endpoints:
``POST /v1/completions``, ``POST /v1/chat/completions`` (server-sent
events with ``stream: true``, ending ``data: [DONE]``), ``GET /v1/models``
and ``GET /health`` (200 while the router can serve, else 503).

Errors have OpenAI's shape (``{"error": {"message", "type", "param",
"code"}}``): 400 naming the parameter, 401 without the bearer token (the
gRPC one; ``/health`` stays open), 404 for another model or path, 413 for a
body over ``router.max_request_bytes``, 429 with ``Retry-After`` when
``router.max_queued`` requests are in flight, 408 for a body that does not
arrive whole within 30 s, 503 (with ``Retry-After``)
while draining, with no live worker, or without KV room in time, 504 past
``router.request_timeout_s``, 500 when a worker's engine failed the request.
A client that disconnects (mid-stream or while waiting for a whole answer)
cancels its requests: both workers drop them and free their KV at once, as
for a gRPC cancel. TLS with the gRPC port's certificate when configured.

``n`` > 1 runs each prompt as one request with ``n`` samples
(``ParsedRequest.n``) through the lifecycle: the prompt is prefilled once,
and the ``n`` samples share its KV blocks copy-on-write on one decode (or
colocated) worker; sample ``i`` samples with seed ``seed + i``, so it equals
a lone request with that seed. Each sample counts against ``router.max_queued``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import replace

from aiohttp import web
from google.protobuf import json_format

from engine.sampling_params import InvalidRequestError
from protos import serving_pb2
from router.fan_in import fan_in
from router.lifecycle import Refusal, RequestLifecycle, RequestRefused, fill_timings
from router.openai_schema import (ChoiceState, OpenAIRequest, choice_logprobs, error_body, full_response,
                                  models_response, openai_param, parse_chat, parse_completions, stream_chunk,
                                  usage_chunk)
from router.request_runner import RequestTrace
from router.validation import DEFAULT_MAX_TOKENS, ParsedRequest

log = logging.getLogger(__name__)
BODY_TIMEOUT_S = 30.0  # a body that does not arrive whole within this is refused (408)
RETRY_AFTER_S = 1
# HTTP status, OpenAI error type and code of each way a request can fail (docs/architecture.md, "Errors").
HTTP_STATUS: dict[Refusal, tuple[int, str, str | None]] = {
    Refusal.INVALID: (400, "invalid_request_error", None),
    Refusal.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    Refusal.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    Refusal.BUSY: (429, "rate_limit_error", "rate_limit_exceeded"),
    Refusal.NO_CAPACITY: (503, "server_error", "no_capacity"),
    Refusal.DUPLICATE: (409, "invalid_request_error", "duplicate_request_id"),
    Refusal.DRAINING: (503, "server_error", "service_unavailable"),
    Refusal.FAILED: (503, "server_error", "service_unavailable"),
    Refusal.DEADLINE: (504, "server_error", "timeout"),
    Refusal.INTERNAL: (500, "server_error", "internal_error"),
}
RETRY_STATUSES = (429, 503)  # answered with Retry-After


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in RETRY_STATUSES else None
    return web.json_response(error_body(message, type_, param, code), status=status, headers=headers)


def refusal_response(e: RequestRefused) -> web.Response:
    status, type_, code = HTTP_STATUS[e.refusal]
    param = openai_param(e.field) if e.field else None
    message = str(e)
    if e.field and message.startswith(f"{e.field}:"):  # name the parameter as the client spelled it
        message = f"{param}:{message[len(e.field) + 1:]}"
    return error_response(status, message, type_, param, code)


def _timings_json(trace: RequestTrace) -> dict:
    pb = serving_pb2.Timings()
    fill_timings(pb, trace)
    return json_format.MessageToDict(pb, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class OpenAIServer:
    """The HTTP server; ``can_serve`` says whether a live worker of each needed kind
    exists and the router admits (``RouterServer.can_serve``)."""

    def __init__(self, lifecycle: RequestLifecycle, can_serve: Callable[[], bool], host: str, port: int, *,
                 tls: tuple[str, str] | None = None, token: str | None = None,
                 max_request_bytes: int = 1 << 20, body_timeout_s: float = BODY_TIMEOUT_S,
                 reuse_port: bool = False) -> None:
        """``reuse_port``: bind with SO_REUSEPORT, so that router replicas in
        other processes serve the same HTTP port (as they do the gRPC port)."""
        self.lifecycle = lifecycle
        self.reuse_port = reuse_port
        self.body_timeout_s = body_timeout_s
        self.can_serve = can_serve
        self.host, self.requested_port = host, port
        self.tls = tls
        self._token = token.encode() if token is not None else None
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        self.app = web.Application(client_max_size=max_request_bytes, middlewares=[self._errors, self._auth])
        self.app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
        ])
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def model(self) -> str:
        return self.lifecycle.limits.name

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, which drops its requests.
        # shutdown_timeout: by the time stop() runs, the drain has waited for in-flight requests
        # (RouterServer.stop); what is left is cancelled after a second, as gRPC's stop grace.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
        site = web.TCPSite(self._runner, self.host, self.requested_port, ssl_context=context,
                           reuse_port=self.reuse_port or None)
        try:
            await site.start()
        except OSError as e:
            raise RuntimeError(f"router.http_port: cannot bind {self.host}:{self.requested_port}: {e}") from None
        self.port = site._server.sockets[0].getsockname()[1]  # the bound port (0 asks for a free one)
        scheme = "https" if context else "http"
        log.info("OpenAI-compatible API on %s://%s:%d/v1", scheme, self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ middleware
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every error in OpenAI's shape, aiohttp's own (404, 405, 413) included."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 408: "timeout",
                    413: "request_too_large"}.get(e.status)
            reason = e.text if e.status != 413 else (
                f"request: the body exceeds the limit of {self.max_request_bytes} bytes (router.max_request_bytes)")
            return error_response(e.status, reason or e.reason, "invalid_request_error", None, code)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """The gRPC port's bearer token, checked before the body is read; ``/health`` stays open."""
        if self._token is None or request.path == "/health":
            return await handler(request)
        value = request.headers.get("Authorization")
        scheme, _, presented = (value or "").strip().partition(" ")
        if value is None or scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode("utf-8", "replace"), self._token):
            message = "missing bearer token (Authorization header)" if value is None else "invalid bearer token"
            response = error_response(401, message, "invalid_request_error", None, "invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await handler(request)

    # ------------------------------------------------------------- endpoints
    async def health(self, request: web.Request) -> web.Response:
        ok = self.can_serve()
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(models_response(self.model, self.created))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, lambda body: parse_completions(body, DEFAULT_MAX_TOKENS))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        # Unset max_tokens: as much as the context allows (the engine stops at max_model_len), as OpenAI does.
        return await self._serve(request, lambda body: parse_chat(body, self.lifecycle.limits.max_model_len))

    # --------------------------------------------------------------- serving
    async def _body(self, request: web.Request):
        if request.content_length is not None and request.content_length > self.max_request_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_request_bytes, actual_size=request.content_length)
        try:
            async with asyncio.timeout(self.body_timeout_s):
                raw = await request.read()
        except TimeoutError:  # a half-sent body holds no admission slot, only this read
            raise web.HTTPRequestTimeout(text=f"body: did not arrive whole within {self.body_timeout_s:g} s") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise self.lifecycle.refuse(Refusal.INVALID, f"body: is not valid JSON ({e})") from None

    async def _serve(self, request: web.Request, parse) -> web.StreamResponse:
        received = time.time()
        life = self.lifecycle
        try:
            body = await self._body(request)
            try:
                oai: OpenAIRequest = parse(body)
            except InvalidRequestError as e:
                raise life.refuse(Refusal.INVALID, str(e), e.field) from None
            if oai.model and oai.model != self.model:
                raise life.refuse(Refusal.NOT_FOUND, f"model: {oai.model!r} is not served here; this cluster "
                                  f"serves {self.model!r}", "model")
            if life.accepting and not self.can_serve():
                raise life.refuse(Refusal.FAILED, "no live worker can serve the request now; retry later")
            # One request per prompt, with n samples (each counts against max_queued), checked together.
            ids = [f"{oai.response_id}-{p}" for p in range(len(oai.prompts))]
            copies = []
            for p, prompt in enumerate(oai.prompts):
                copy = serving_pb2.GenerateRequest()
                copy.CopyFrom(prompt)
                copy.request_id = ids[p]
                copies.append(copy)
            life.check(copies, oai.n)
        except RequestRefused as e:
            return refusal_response(e)
        with life.holding(ids, oai.n):
            try:
                parsed = []
                for p, prompt in enumerate(oai.prompts):  # tokenized once per prompt
                    one = await life.parse(prompt)
                    params = one.params if oai.seed is None else replace(one.params, seed=oai.sample_seed(0))
                    parsed.append(ParsedRequest(ids[p], one.prompt_token_ids, params, n=oai.n))
            except RequestRefused as e:
                return refusal_response(e)
            traces = [RequestTrace(received=received) for _ in parsed]
            if oai.stream:
                return await self._stream(request, oai, parsed, traces)
            return await self._whole(oai, parsed, traces)

    async def _drive(self, oai: OpenAIRequest, parsed, traces, on_chunk) -> RequestRefused | None:
        """Run the prompts' requests together, calling ``on_chunk(choice, prompt, chunk)`` in arrival
        order; the first refusal ends the others and is returned. However this ends (a client gone
        cancels it), every request still running is cancelled, which drops all its samples on both
        workers."""
        streams = {p: self.lifecycle.run(parsed[p], traces[p]) for p in range(len(parsed))}
        try:
            async with aclosing(fan_in(streams)) as chunks:
                async for p, ev in chunks:
                    await on_chunk(oai.choice(p, ev.index), p, ev)
        except RequestRefused as e:
            return e
        return None

    def _token_text(self, token_id: int) -> str:
        return self.lifecycle.tokenizer.decode([token_id])

    async def _whole(self, oai: OpenAIRequest, parsed, traces) -> web.Response:
        states = [ChoiceState() for _ in range(oai.num_choices)]

        async def on_chunk(i: int, p: int, ev) -> None:
            st = states[i]
            st.text += ev.text
            st.token_ids += ev.token_ids
            st.logprobs += ev.logprobs
            if ev.finished:
                st.finish_reason = ev.finish_reason
                st.timings = _timings_json(traces[p])

        refused = await self._drive(oai, parsed, traces, on_chunk)
        if refused is not None:
            return refusal_response(refused)
        prompt_tokens = sum(len(p.prompt_token_ids) for p in parsed)
        return web.json_response(full_response(oai, int(traces[0].received), self.model, states, prompt_tokens,
                                               self._token_text))

    async def _stream(self, request: web.Request, oai: OpenAIRequest, parsed, traces) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(traces[0].received)
        started = [False] * oai.num_choices
        offsets = [0] * oai.num_choices
        completion_tokens = 0

        async def send(obj) -> None:
            await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

        async def on_chunk(i: int, p: int, ev) -> None:
            nonlocal completion_tokens
            completion_tokens += len(ev.token_ids)
            lps = choice_logprobs(oai, list(ev.logprobs), self._token_text, offsets[i])
            offsets[i] += len(ev.text)
            timings = _timings_json(traces[p]) if ev.finished else None
            await send(stream_chunk(oai, created, self.model, i, ev.text, list(ev.token_ids), lps,
                                    ev.finish_reason if ev.finished else None, timings, first=not started[i]))
            started[i] = True

        try:
            refused = await self._drive(oai, parsed, traces, on_chunk)
        except ConnectionResetError:  # the client went away mid-stream: its samples are already dropped
            return response
        if refused is not None:  # the status line is gone: the error travels as an event, as vLLM sends it
            status, type_, code = HTTP_STATUS[refused.refusal]
            await send(error_body(str(refused), type_, openai_param(refused.field) if refused.field else None,
                                  code))
        elif oai.include_usage:
            prompt_tokens = sum(len(p.prompt_token_ids) for p in parsed)
            await send(usage_chunk(oai, created, self.model, prompt_tokens, completion_tokens))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
