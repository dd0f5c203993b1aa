"""The OpenAI-compatible HTTP API on a real router server (aiohttp + grpc.aio on one
event loop) with a stand-in runner: the official ``openai`` SDK and raw HTTP see
OpenAI's shapes, every error status, and a disconnect that cancels the request.
The same API against a real cluster: tests/integration/test_openai_http.py."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time

import urllib.error
import urllib.request

import grpc
import openai
import pytest

from engine.sampler import TokenLogprob
from engine.tiny_model import build_tiny_tokenizer
from protos import serving_pb2_grpc
from router.client import build_request
from router.directory import WorkerInfo
from router.openai_schema import TIMINGS_FIELD, UNSUPPORTED
from router.server import RouterServer, ServingServicer
from router.validation import LIMITS
from worker_common.messages import ModelLimits, TokenChunk

MODEL = ModelLimits("tiny", 1024, 300)
TOKEN = "s3cret-token"


class Runner:
    """Streams ``max_tokens`` tokens 10, 11, ... (text "t0 ", "t1 ", ...); a prompt holding
    "HOLD" waits before its first token until ``release`` is set. Records ends."""

    colocated = False

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.ended: list[tuple[str, str]] = []  # (request id, "done" | "cancelled")
        self.seeds: list[int | None] = []

    async def run(self, req, trace, deadline=None):
        self.started.append(req.request_id)
        self.seeds += [req.params.for_sample(s).seed for s in range(req.n)]
        how = "cancelled"
        try:
            if 60 in req.prompt_token_ids or "HOLD" in build_tiny_tokenizer().decode(req.prompt_token_ids):
                await self.release.wait()
            n = req.params.max_tokens
            for i in range(n):
                lp = ()
                if req.params.logprobs is not None:
                    lp = (TokenLogprob(10 + i, -0.25 * (i + 1), ((10 + i, -0.25 * (i + 1)), (3, -4.0))[:req.params.logprobs]),)
                for sample in range(req.n):  # a request's samples stream side by side
                    trace.token_sent(1)
                    yield TokenChunk((10 + i,), f"t{i} ", i == n - 1, "length" if i == n - 1 else None, lp,
                                     index=sample)
                await asyncio.sleep(0.001)
            how = "done"
        finally:
            self.ended.append((req.request_id, how))


class Directory:
    def __init__(self) -> None:
        self.workers = {k: WorkerInfo(f"{k}-0", k, None, {}, "node", alive=True) for k in ("prefill", "decode")}
        self.targets: dict[str, int] = {}

    def of_kind(self, kind: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.kind == kind]

    async def refresh(self) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Served:
    """A RouterServer with the HTTP API on its own thread's event loop."""

    def __init__(self, token: str | None = None, max_queued: int = 8, max_request_bytes: int = 1 << 20,
                 tls: tuple[str, str] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            self.runner = Runner()
            self.directory = Directory()
            servicer = ServingServicer(self.runner, self.directory, build_tiny_tokenizer(), MODEL, max_queued)
            self.server = RouterServer(servicer, "127.0.0.1", 0, token=token, http_port=0,
                                       max_request_bytes=max_request_bytes, tls=tls)
            await self.server.start()

        self.call(start())
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.http.port}"

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.runner.release.set)

    def close(self) -> None:
        self.release()
        self.call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def served():
    s = Served()
    yield s
    s.close()


def sdk(served: Served, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=30, **kw)


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# ------------------------------------------------------------------ shapes
def test_completion_and_chat_have_openais_shape(served):
    client = sdk(served)
    c = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    assert c.object == "text_completion" and c.id.startswith("cmpl-") and c.model == "tiny"
    assert [(ch.index, ch.text, ch.finish_reason) for ch in c.choices] == [(0, "t0 t1 t2 ", "length")]
    assert c.usage.completion_tokens == 3 and c.usage.prompt_tokens > 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + 3
    timings = c.choices[0].model_extra[TIMINGS_FIELD]
    assert timings["attempts"] == 0 and len(timings["timeline"]["token_ms"]) == 3  # the stand-in runs no attempt
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=2, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == "t0 t1 "
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_streams_end_with_done_and_carry_usage_when_asked(served):
    client = sdk(served)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "t0 t1 t2 "
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices] == [None, None, "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    with urllib.request.urlopen(urllib.request.Request(
            served.base + "/v1/completions", data=json.dumps({"prompt": "x", "max_tokens": 2, "stream": True}).encode(),
            headers={"Content-Type": "application/json"}), timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and len(events) == 3


def test_n_samples_are_one_request_with_consecutive_seeds_and_logprobs(served):
    client = sdk(served)
    started = len(served.runner.started)
    c = client.completions.create(model="tiny", prompt="hello", max_tokens=2, n=3, seed=40, logprobs=2)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2] and c.usage.completion_tokens == 6
    assert len(served.runner.started) == started + 1  # one request carries the three samples
    assert served.runner.seeds[-3:] == [40, 41, 42]
    assert all(ch.text == "t0 t1 " and ch.finish_reason == "length" for ch in c.choices)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs == [-0.25, -0.5] and len(lp.top_logprobs[0]) == 2 and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          logprobs=True, top_logprobs=1, n=2)
    content = chat.choices[1].logprobs.content
    assert [e.logprob for e in content] == [-0.25, -0.5] and len(content[0].top_logprobs) == 1
    # A list of prompts: choice index = prompt * n + sample.
    c = client.completions.create(model="tiny", prompt=["a", [5, 6, 7]], max_tokens=1, n=2)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2, 3]


# ------------------------------------------------------------------ errors
def _status(fn) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value.status_code, e.value.body


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"),
    (dict(logprobs=6), "logprobs"),
    (dict(stop=["s"] * (LIMITS["sampling.stop"].most + 1)), "stop"),
    (dict(extra_body={"logit_bias": {"5": 1}}), "logit_bias"),
    (dict(extra_body={"echo": True}), "echo"),
    (dict(extra_body={"max_tokens": "ten"}), "max_tokens"),
    (dict(extra_body={"temperature": True}), "temperature"),
    (dict(extra_body={"prompt": [[1, "x"]]}), "prompt[0]"),
    (dict(extra_body={"prompt": [1, 10_000]}), "prompt[1]"),  # a token id outside the vocabulary
])
def test_a_bad_parameter_is_a_400_naming_it(served, kwargs, param):
    status, body = _status(lambda: sdk(served).completions.create(model="tiny", prompt="hi", **kwargs))
    assert status == 400 and body["param"] == param and body["type"] == "invalid_request_error", body
    assert body["message"].startswith(param), body


def test_unknown_fields_are_ignored_and_known_unsupported_ones_refused(served):
    assert post(served.base + "/v1/completions", {"prompt": "hi", "max_tokens": 1, "frobnicate": 3,
                                                  "user": "me", "echo": False})[0] == 200
    status, _, body = post(served.base + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]})
    assert status == 400 and body["error"]["param"] == "tools"
    assert {"tools", "response_format", "logit_bias", "echo"} <= set(UNSUPPORTED)
    status, _, body = post(served.base + "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "messages[0].role", body


def test_raw_http_errors(served):
    url = served.base + "/v1/completions"
    status, _, body = post(url, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, _, body = post(url, b"[1, 2]")
    assert status == 400 and body["error"]["param"] == "body"
    status, _, body = post(url, {"prompt": "x" * (10 << 20)})  # a 10 MB body
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, _, body = post(url, {"prompt": "hi", "model": "gpt-4"})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    status, _, body = post(served.base + "/v1/nothing", {})
    assert status == 404 and "error" in body


def test_a_half_sent_body_and_a_disconnect_leave_the_server_serving(served):
    with socket.create_connection(("127.0.0.1", served.server.http.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hi")
    n_started = len(served.runner.started)
    assert post(served.base + "/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200
    assert len(served.runner.started) == n_started + 1  # the half-sent one never ran
    # A body that stalls half-way is answered 408 once the body timeout passes.
    served.server.http.body_timeout_s = 0.3
    try:
        with socket.create_connection(("127.0.0.1", served.server.http.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hi")
            answer = s.recv(65536).decode()
    finally:
        served.server.http.body_timeout_s = 30.0
    assert answer.startswith("HTTP/1.1 408") and '"code": "timeout"' in answer, answer
    assert served.server.servicer.inflight == 0


def _wait(predicate, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _health(s: Served) -> int:
    try:
        return urllib.request.urlopen(s.base + "/health", timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_client_that_disconnects_mid_stream_cancels_its_request(served):
    body = json.dumps({"prompt": "HOLD on", "max_tokens": 50, "stream": True}).encode()
    n_started = len(served.runner.started)
    with socket.create_connection(("127.0.0.1", served.server.http.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait(lambda: len(served.runner.started) > n_started, "the request to start")
        rid = served.runner.started[-1]
    t0 = time.monotonic()
    _wait(lambda: (rid, "cancelled") in served.runner.ended, "the cancel")
    assert time.monotonic() - t0 < 1.0, "the disconnect did not cancel the request within 1 s"
    _wait(lambda: served.server.servicer.inflight == 0, "nothing in flight")


def test_auth_busy_no_worker_and_draining_statuses():
    s = Served(token=TOKEN, max_queued=2)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        status, body = _status(lambda: sdk(s).models.list())
        assert status == 401 and body["code"] == "invalid_api_key"
        status, headers, _ = post(s.base + "/v1/completions", {"prompt": "hi"})
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert _health(s) == 200  # open without a token
        client = sdk(s, api_key=TOKEN)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=1).choices[0].text == "t0 "
        # Two held samples fill max_queued=2, for HTTP and gRPC alike.
        held = threading.Thread(target=lambda: client.completions.create(model="tiny", prompt="HOLD", max_tokens=1,
                                                                         n=2))
        held.start()
        _wait(lambda: s.server.servicer.inflight == 2, "two held samples")
        status, body = _status(lambda: client.completions.create(model="tiny", prompt="hi"))
        assert status == 429 and body["code"] == "rate_limit_exceeded"
        status, headers, _ = post(s.base + "/v1/completions", {"prompt": "hi"}, auth)
        assert status == 429 and headers["Retry-After"] == "1"
        with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                list(serving_pb2_grpc.ServingStub(ch).Generate(build_request("hi"), timeout=10,
                                                               metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        s.release()
        held.join(10)
        # No live decode worker: 503 at once, and /health says so; then draining: 503.
        s.directory.workers["decode"].alive = False
        status, headers, body = post(s.base + "/v1/completions", {"prompt": "hi"}, auth)
        assert status == 503 and headers["Retry-After"] == "1" and body["error"]["type"] == "server_error"
        assert _health(s) == 503
        s.directory.workers["decode"].alive = True
        s.server.servicer.accepting = False
        status, _, body = post(s.base + "/v1/completions", {"prompt": "hi"}, auth)
        assert status == 503 and "shutting down" in body["error"]["message"]
        s.server.servicer.accepting = True
    finally:
        s.close()


def test_tls_of_the_grpc_port_serves_https(tmp_path):
    import httpx2  # the openai SDK's HTTP client

    from tests.router.test_security import self_signed

    cert, key = self_signed(tmp_path, "server", ["localhost"], ["127.0.0.1"])
    s = Served(token=TOKEN, tls=(cert, key))
    try:
        client = openai.OpenAI(base_url=s.base + "/v1", api_key=TOKEN, max_retries=0, timeout=30,
                               http_client=httpx2.Client(verify=ssl.create_default_context(cafile=cert)))
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text == "t0 t1 "
        with pytest.raises(openai.APIConnectionError):  # plain HTTP to the TLS port
            openai.OpenAI(base_url=s.base.replace("https", "http") + "/v1", api_key=TOKEN, max_retries=0,
                          timeout=10).models.list()
    finally:
        s.close()
