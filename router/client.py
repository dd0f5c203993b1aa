"""Client library (sync and async) and CLI for the splitserve router.

    python -m router.client "Why is the sky blue?"          # chat message, streamed
    python -m router.client --raw "Once upon a time"        # raw prompt
    python -m router.client --status                        # pools and workers
    python -m router.client --address h1:50051,h2:50051 "Hi"   # router replicas: retried on the next
    SPLITSERVE_TOKEN=... python -m router.client --tls-ca ca.pem --address host:50051 "Hi"

With ``--tls-ca`` the channel is TLS and trusts that CA (or self-signed
certificate); a token (``--token-file`` or the ``SPLITSERVE_TOKEN``
environment variable) is sent as ``authorization: Bearer <token>`` on every
call. A token sent without TLS is readable by anyone on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from observability.stages import TIMINGS_FIELDS, Stage
from protos import serving_pb2, serving_pb2_grpc
from router.security import auth_metadata, channel_credentials, load_secret

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_ENV = "SPLITSERVE_TOKEN"
FINISH_NAMES = {serving_pb2.FINISH_REASON_STOP: "stop", serving_pb2.FINISH_REASON_LENGTH: "length",
                serving_pb2.FINISH_REASON_ABORT: "abort", serving_pb2.FINISH_REASON_UNSPECIFIED: None}


@dataclass
class Completion:
    """A whole answer, assembled from the stream."""

    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: serving_pb2.Usage | None = None
    timings: serving_pb2.Timings | None = None
    logprobs: list[serving_pb2.TokenLogprob] = field(default_factory=list)  # when asked for

    def add(self, resp: serving_pb2.GenerateResponse) -> None:
        self.request_id = resp.request_id
        self.token_ids += list(resp.token_ids)
        self.logprobs += list(resp.logprobs)
        self.text += resp.text
        if resp.finish_reason:
            self.finish_reason = FINISH_NAMES[resp.finish_reason]
            self.usage, self.timings = resp.usage, resp.timings


def build_request(prompt: str | None = None, messages: list[dict] | None = None, *, request_id: str = "",
                  model: str = "", max_tokens: int | None = None, temperature: float | None = None, top_k: int = 0,
                  top_p: float | None = None, seed: int | None = None, stop: list[str] | tuple = (),
                  stop_token_ids: list[int] | tuple = (), ignore_eos: bool = False, logprobs: int | None = None,
                  prompt_token_ids: list[int] | None = None) -> serving_pb2.GenerateRequest:
    """A ``GenerateRequest`` from a raw prompt, chat ``messages`` (``[{"role", "content"}]``) or ``prompt_token_ids``."""
    sp = serving_pb2.SamplingParams(top_k=top_k, stop=list(stop), stop_token_ids=list(stop_token_ids),
                                    ignore_eos=ignore_eos)
    if max_tokens is not None:  # unset: the server's default
        sp.max_tokens = max_tokens
    if temperature is not None:
        sp.temperature = temperature
    if top_p is not None:
        sp.top_p = top_p
    if seed is not None:
        sp.seed = seed
    if logprobs is not None:
        sp.logprobs = logprobs
    req = serving_pb2.GenerateRequest(request_id=request_id, model=model, sampling=sp)
    if prompt_token_ids is not None:
        req.prompt_token_ids.ids.extend(prompt_token_ids)
        req.prompt_token_ids.SetInParent()
    elif messages is not None:
        req.chat.messages.extend(serving_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        req.chat.SetInParent()  # an empty list still selects the chat form
    elif prompt is not None:
        req.prompt = prompt
    return req


RECONNECT_BACKOFF_MS = 100  # a channel whose router died tries the port again this soon


def _channel_options(server_name: str | None) -> list[tuple[str, str | int]]:
    # Each client its own connection (gRPC otherwise shares one per target in a
    # process): router replicas behind one port get the clients spread over them.
    options: list[tuple[str, str | int]] = [("grpc.use_local_subchannel_pool", 1)]
    # After its router dies a channel waits out gRPC's reconnect backoff (1 s at
    # first) before it tries the port again, failing every call meanwhile; a live
    # replica is already there, so reconnect within RetryPolicy's first pauses.
    options += [("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
                ("grpc.max_reconnect_backoff_ms", 2000)]
    if server_name:  # check the server's certificate against this name instead of the address's host
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _open_channel(address: str, tls_ca: str | None, server_name: str | None, aio: bool) -> grpc.Channel:
    """A plaintext channel, or a TLS one trusting ``tls_ca`` (a PEM path or PEM text)."""
    options = _channel_options(server_name)
    if tls_ca is None:
        if server_name:
            raise ValueError("server_name only applies to TLS: give tls_ca as well")
        return (grpc.aio.insecure_channel(address, options=options) if aio
                else grpc.insecure_channel(address, options=options))
    creds = channel_credentials(tls_ca)
    return (grpc.aio.secure_channel(address, creds, options=options) if aio
            else grpc.secure_channel(address, creds, options=options))


@dataclass(frozen=True)
class RetryPolicy:
    """When the client library tries a request again on another router address.

    Only ``UNAVAILABLE`` (a router that died, is draining or cannot be
    reached) and only before the first response: once tokens have streamed,
    a retry could duplicate them, so the error goes to the caller.
    """

    max_tries: int = 6  # calls in all, over the addresses in turn (pauses 0.1 + 0.2 + ... + 1.6 s)
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def should_retry(self, error: grpc.RpcError, *, started: bool, tries: int, deadline: float) -> bool:
        """Whether a call that failed with ``error`` is tried again (the one rule for sync and async)."""
        return (not started and error.code() in RETRYABLE_CODES and tries < self.max_tries
                and time.monotonic() < deadline)

    def backoff_s(self, failed_tries: int) -> float:
        """Pause after ``failed_tries`` failed calls (exponential, capped)."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(failed_tries - 1, 0))


RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
NO_RETRY = RetryPolicy(max_tries=1)


def parse_addresses(address: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"h1:p1,h2:p2"`` or a list of ``host:port`` strings -> a non-empty list."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    addresses = [a.strip() for a in parts if a and a.strip()]
    if not addresses:
        raise ValueError(f"no router address in {address!r}")
    return addresses


class _Routers:
    """One channel per router address, and which one to use next (rotating on failure)."""

    def __init__(self, address: str | list[str], tls_ca: str | None, server_name: str | None, aio: bool) -> None:
        self.addresses = parse_addresses(address)
        self.channels = [_open_channel(a, tls_ca, server_name, aio) for a in self.addresses]
        self.stubs = [serving_pb2_grpc.ServingStub(c) for c in self.channels]
        self.current = 0

    def advance(self) -> None:
        self.current = (self.current + 1) % len(self.addresses)


class RetryingStream:
    """The responses of one ``Generate``, retried on another router while none has arrived.

    Iterate it like the gRPC call it wraps; :meth:`cancel` cancels the call in
    flight. The first call starts at once (as a plain gRPC call does).
    """

    def __init__(self, routers: _Routers, request: serving_pb2.GenerateRequest, timeout_s: float,
                 metadata: tuple, retry: RetryPolicy) -> None:
        self._routers, self._request, self._metadata, self._retry = routers, request, metadata, retry
        self._deadline = time.monotonic() + timeout_s
        self._tries = 0
        self._started = False  # a response has arrived: no more retries
        self._cancelled = False
        self._call = self._start()

    def _start(self):
        self._tries += 1
        remaining = max(self._deadline - time.monotonic(), 0.001)
        return self._routers.stubs[self._routers.current].Generate(self._request, timeout=remaining,
                                                                   metadata=self._metadata)

    def __iter__(self) -> "RetryingStream":
        return self

    def __next__(self) -> serving_pb2.GenerateResponse:
        while True:
            try:
                resp = next(self._call)
                self._started = True
                return resp
            except grpc.RpcError as e:
                if self._cancelled or not self._retry.should_retry(e, started=self._started, tries=self._tries,
                                                                   deadline=self._deadline):
                    raise
                self._routers.advance()
                time.sleep(self._retry.backoff_s(self._tries))
                self._call = self._start()

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel()


class Client:
    """Blocking client; every call has a deadline.

    ``address``: one ``host:port``, or several (a list, or comma-separated)
    of router replicas: a request that gets ``UNAVAILABLE`` before its first
    token is tried again on the next one, per ``retry``.
    ``tls_ca``: trust this CA / self-signed certificate (a PEM file path or
    the PEM text) and speak TLS; ``server_name``: the name to check the
    server's certificate against when it differs from the address's host;
    ``token``: sent as ``authorization: Bearer <token>`` on every call.
    """

    def __init__(self, address: str | list[str] = DEFAULT_ADDRESS, timeout_s: float = 600.0, *,
                 tls_ca: str | None = None, token: str | None = None, server_name: str | None = None,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.metadata = auth_metadata(token)  # validated before a channel is opened
        self.routers = _Routers(address, tls_ca, server_name, aio=False)
        self.timeout_s = timeout_s
        self.retry = retry

    @property
    def channel(self) -> grpc.Channel:
        """The channel to the router in use now."""
        return self.routers.channels[self.routers.current]

    @property
    def stub(self) -> serving_pb2_grpc.ServingStub:
        """A stub on the router in use now (no retries: for tests that need the raw call)."""
        return self.routers.stubs[self.routers.current]

    def stream(self, prompt: str | None = None, messages: list[dict] | None = None, **kw) -> RetryingStream:
        return RetryingStream(self.routers, build_request(prompt, messages, **kw), self.timeout_s, self.metadata,
                              self.retry)

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None, **kw) -> Completion:
        c = Completion()
        for resp in self.stream(prompt, messages, **kw):
            c.add(resp)
        return c

    def status(self) -> serving_pb2.ClusterStatusResponse:
        return self.stub.ClusterStatus(serving_pb2.ClusterStatusRequest(), timeout=30, metadata=self.metadata)

    def health(self, service: str = "", timeout_s: float = 2.0) -> int:
        """One health ``Check`` of the router in use now: the ``HealthCheckResponse`` status (SERVING is 1)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                          metadata=self.metadata).status

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the health service reports SERVING."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"router not SERVING after {timeout_s:.0f} s")
            time.sleep(0.5)

    def close(self) -> None:
        for channel in self.routers.channels:
            channel.close()


class AsyncClient:
    """``grpc.aio`` client; takes the same arguments as :class:`Client`, and retries the same way."""

    def __init__(self, address: str | list[str] = DEFAULT_ADDRESS, timeout_s: float = 600.0, *,
                 tls_ca: str | None = None, token: str | None = None, server_name: str | None = None,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        self.metadata = auth_metadata(token)
        self.routers = _Routers(address, tls_ca, server_name, aio=True)
        self.timeout_s = timeout_s
        self.retry = retry

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.routers.channels[self.routers.current]

    @property
    def stub(self) -> serving_pb2_grpc.ServingStub:
        return self.routers.stubs[self.routers.current]

    async def stream(self, prompt: str | None = None, messages: list[dict] | None = None, **kw) -> AsyncIterator[serving_pb2.GenerateResponse]:
        request = build_request(prompt, messages, **kw)
        deadline = time.monotonic() + self.timeout_s
        tries = 0
        while True:
            tries += 1
            started = False
            call = self.stub.Generate(request, timeout=max(deadline - time.monotonic(), 0.001),
                                      metadata=self.metadata)
            try:
                async for resp in call:
                    started = True
                    yield resp
                return
            except grpc.RpcError as e:
                if not self.retry.should_retry(e, started=started, tries=tries, deadline=deadline):
                    raise
            finally:
                call.cancel()  # no-op once finished; ends the call if the consumer stopped early
            self.routers.advance()
            await asyncio.sleep(self.retry.backoff_s(tries))

    async def generate(self, prompt: str | None = None, messages: list[dict] | None = None, **kw) -> Completion:
        c = Completion()
        async for resp in self.stream(prompt, messages, **kw):
            c.add(resp)
        return c

    async def status(self) -> serving_pb2.ClusterStatusResponse:
        return await self.stub.ClusterStatus(serving_pb2.ClusterStatusRequest(), timeout=30, metadata=self.metadata)

    async def health(self, service: str = "", timeout_s: float = 2.0) -> int:
        """One health ``Check``: the ``HealthCheckResponse`` status (SERVING is 1)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                                metadata=self.metadata)
        return resp.status

    async def close(self) -> None:
        for channel in self.routers.channels:
            await channel.close()


def cli_token(token_file: str | None) -> str | None:
    """The CLI's token: ``--token-file``, else ``$SPLITSERVE_TOKEN`` if set, else None."""
    if token_file is not None:
        return load_secret(file=token_file)
    if TOKEN_ENV in os.environ:
        return load_secret(env=TOKEN_ENV)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?")
    ap.add_argument("--address", default=DEFAULT_ADDRESS,
                    help="router host:port, or several comma-separated (tried in turn while UNAVAILABLE)")
    ap.add_argument("--raw", action="store_true", help="send the prompt as raw text, not as a chat message")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeline", action="store_true", help="print where the time went, stage by stage")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--status", action="store_true", help="print the pools and workers and exit")
    ap.add_argument("--tls-ca", metavar="PATH", help="speak TLS, trusting this CA / self-signed certificate (PEM)")
    ap.add_argument("--server-name", help="the name in the server's certificate, when not the address's host")
    ap.add_argument("--token-file", metavar="PATH",
                    help=f"file holding the bearer token (default: ${TOKEN_ENV} if set)")
    args = ap.parse_args(argv)
    try:
        client = Client(args.address, tls_ca=args.tls_ca, token=cli_token(args.token_file),
                        server_name=args.server_name)
    except ValueError as e:  # SecurityConfigError included: a missing or bad token source
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.status:
            print(client.status())
            return 0
        if not args.prompt:
            ap.error("a prompt is required (or --status)")
        kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed)
        stream = client.stream(args.prompt, **kw) if args.raw else client.stream(
            messages=[{"role": "user", "content": args.prompt}], **kw)
        c = Completion()
        for resp in stream:
            c.add(resp)
            print(resp.text, end="", flush=True)
        t = c.timings
        print(flush=True)
        print(f"[{c.usage.completion_tokens} tokens, finish={c.finish_reason}, TTFT {t.ttft_ms:.0f} ms, "
              f"TPOT {t.tpot_ms:.1f} ms, prefill {t.prefill_worker} -> decode {t.decode_worker}]", file=sys.stderr)
        if args.timeline:
            print(format_stages(t), file=sys.stderr)
        return 0
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()


def format_stages(t: serving_pb2.Timings) -> str:
    """A request's stage breakdown, one line per stage, the slowest marked."""
    lines = [f"  {stage.value:<14}{getattr(t, TIMINGS_FIELDS[stage]):9.1f} ms"
             f"{'  <- slowest' if stage.value == t.slowest_stage else ''}" for stage in Stage]
    extra = (f"  path: {t.path or '-'}; KV moved: {t.transfer_bytes} bytes (saved by the decode cache: "
             f"{t.transfer_bytes_saved}); cached tokens: prefill {t.prefill_cached_tokens}, decode "
             f"{t.decode_cached_tokens}; attempts: {t.attempts}")
    return "\n".join(["stages:", *lines, extra])


if __name__ == "__main__":
    sys.exit(main())
