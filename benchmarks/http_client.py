"""A load-generator client for the router's OpenAI-compatible HTTP API.

It has the interface of :class:`router.client.AsyncClient` that
``benchmarks.loadgen`` uses (``stream``, ``status``, ``close``) and yields the
same ``GenerateResponse`` messages, built from the server-sent events of
``/v1/completions`` (a prompt) or ``/v1/chat/completions`` (messages), so one
driver measures either API the same way. It speaks raw ``aiohttp`` (no SDK)
so that the client's own cost stays as small as the gRPC client's. The
stream asks for the ``return_token_ids`` and ``ignore_eos`` extensions and
for the usage chunk; the router's stage timings come from each finished
choice's ``splitserve_timings``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator

import aiohttp
from google.protobuf import json_format

from protos import serving_pb2
from router.openai_schema import TIMINGS_FIELD

FINISH = {"stop": serving_pb2.FINISH_REASON_STOP, "length": serving_pb2.FINISH_REASON_LENGTH,
          "abort": serving_pb2.FINISH_REASON_ABORT}


class HTTPStatusError(RuntimeError):
    """The server answered with an error status (or an error event mid-stream)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def code_name(self) -> str:
        return f"HTTP_{self.status}"


class OpenAIStreamClient:
    """Streams requests over ``base_url`` (``http://host:port/v1``)."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, *, tls_ca: str | None = None,
                 token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the running loop
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0, ssl=self._ssl if self._ssl is not None else True))
        return self._session

    async def stream(self, prompt: str | None = None, messages: list[dict] | None = None, *,
                     max_tokens: int | None = None, ignore_eos: bool = False, request_id: str = "",
                     temperature: float | None = None, **_ignored) -> AsyncIterator[serving_pb2.GenerateResponse]:
        """One request's chunks as ``GenerateResponse`` s; the last carries finish reason, usage and timings.
        ``temperature`` unset is greedy (0), as the gRPC API's default."""
        body: dict = {"stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
                      "ignore_eos": ignore_eos, "temperature": 0.0 if temperature is None else temperature}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if messages is not None:
            path, body["messages"] = "/chat/completions", messages
        else:
            path, body["prompt"] = "/completions", prompt
        last: serving_pb2.GenerateResponse | None = None  # the finishing chunk, held for the usage chunk
        async with self.session.post(self.base_url + path, json=body) as r:
            if r.status != 200:
                raise HTTPStatusError(r.status, (await r.json()).get("error", {}).get("message", ""))
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise HTTPStatusError(0, event["error"].get("message", ""))
                if not event["choices"]:  # the usage chunk: completes the finished response
                    if last is not None:
                        last.usage.prompt_tokens = event["usage"]["prompt_tokens"]
                        last.usage.completion_tokens = event["usage"]["completion_tokens"]
                    continue
                choice = event["choices"][0]
                text = (choice["delta"].get("content") or "") if "delta" in choice else choice["text"]
                resp = serving_pb2.GenerateResponse(request_id=request_id, token_ids=choice.get("token_ids", ()),
                                                    text=text)
                if not choice.get("finish_reason"):
                    yield resp  # at once: the driver stamps its arrival
                    continue
                resp.finish_reason = FINISH.get(choice["finish_reason"], serving_pb2.FINISH_REASON_UNSPECIFIED)
                if TIMINGS_FIELD in choice:
                    json_format.ParseDict(choice[TIMINGS_FIELD], resp.timings)
                last = resp
        if last is not None:
            yield last

    async def status(self) -> serving_pb2.ClusterStatusResponse:
        """Only the model's name (``/v1/models``); the HTTP API reports no pools."""
        async with self.session.get(self.base_url + "/models") as r:
            r.raise_for_status()
            return serving_pb2.ClusterStatusResponse(model=(await r.json())["data"][0]["id"])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
