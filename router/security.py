"""TLS and bearer-token authentication for the router's gRPC server and its clients.

Server side (the entrypoint wires these in)::

    token = load_secret(env="SPLITSERVE_TOKEN", file=None)      # None: no token required
    server = grpc.aio.server(interceptors=auth_interceptors(token))
    port = add_port(server, "0.0.0.0:50051", cert_path=cert, key_path=key)  # TLS; plaintext without them

Client side: :func:`channel_credentials` (the CA to trust) and
:func:`auth_metadata` (the ``authorization: Bearer <token>`` pair to send on
every call); :class:`router.client.Client` takes ``tls_ca=``/``token=``.

Rules kept here:

1. A secret's value is never logged, echoed in an error or put in a
   ``repr``; errors name where it was looked for (the variable, the path).
2. Tokens are compared with :func:`hmac.compare_digest` (constant time).
3. Denied calls end ``UNAUTHENTICATED`` before the servicer runs, for unary
   and streaming methods alike; health checks and reflection stay open (a
   load balancer must probe without a token) through a constructor argument.
4. A bearer token sent without TLS can be read by anyone on the path: use
   TLS, or keep the router on loopback / a private network.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

AUTH_KEY = "authorization"
# Methods callable without a token: health probes and server reflection.
DEFAULT_PUBLIC_METHODS: frozenset[str] = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})
MISSING = "missing authorization metadata"
INVALID = "invalid bearer token"


class SecurityConfigError(ValueError):
    """A secret, certificate or key could not be loaded; the message names its source."""


# ------------------------------------------------------------------ secrets
def load_secret(*, env: str | None = None, file: str | None = None) -> str | None:
    """The secret held in environment variable ``env`` or in the file at ``file``.

    Surrounding whitespace (a trailing newline) is stripped. None when both
    are None (no secret configured); :class:`SecurityConfigError` naming the
    variable or path when both are given, or when the source is missing or
    empty. A file that other users can read is loaded with a warning.
    """
    if env is not None and file is not None:
        raise SecurityConfigError(f"give the secret in one place: environment variable {env!r} or file {file!r}, "
                                  "not both")
    if env is not None:
        if env not in os.environ:
            raise SecurityConfigError(f"environment variable {env!r} is not set")
        value = os.environ[env].strip()
        if not value:
            raise SecurityConfigError(f"environment variable {env!r} is empty")
        return value
    if file is not None:
        path = Path(file).expanduser()
        try:
            mode = path.stat().st_mode
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SecurityConfigError(f"secret file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SecurityConfigError(f"secret file {str(path)!r} cannot be read: {type(e).__name__}") from None
        if mode & stat.S_IROTH:
            log.warning("secret file %s is readable by every user (mode %o); chmod 600 it", path,
                        stat.S_IMODE(mode))
        value = raw.strip()
        if not value:
            raise SecurityConfigError(f"secret file {str(path)!r} is empty")
        return value
    return None


def _check_token(token: str) -> str:
    # gRPC metadata values must be printable ASCII; a space would split the header.
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise SecurityConfigError("the bearer token must be non-empty printable ASCII without spaces")
    return token


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries ``token`` (empty when there is none)."""
    if token is None:
        return ()
    return ((AUTH_KEY, f"Bearer {_check_token(token)}"),)


# -------------------------------------------------------------- certificates
def _read_pem(path: str, what: str, marker: bytes) -> bytes:
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(f"{what} file {str(p)!r} does not exist") from None
    except OSError as e:
        raise SecurityConfigError(f"{what} file {str(p)!r} cannot be read: {type(e).__name__}") from None
    # gRPC only notices a bad PEM at the handshake, with no hint of which file: check here.
    if b"-----BEGIN" not in data or marker not in data:
        raise SecurityConfigError(f"{what} file {str(p)!r} is not PEM (no '-----BEGIN ...{marker.decode()}' block)")
    return data


def server_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    """TLS credentials of a server from its PEM certificate (chain) and private key files."""
    cert = _read_pem(cert_path, "TLS certificate", b"CERTIFICATE")
    key = _read_pem(key_path, "TLS private key", b"PRIVATE KEY")
    return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(ca: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials of a client that trusts ``ca``: a PEM file path or the PEM text itself.

    None trusts the system's root certificates.
    """
    if ca is None:
        return grpc.ssl_channel_credentials()
    pem = ca.encode() if "-----BEGIN" in ca else _read_pem(ca, "TLS CA certificate", b"CERTIFICATE")
    return grpc.ssl_channel_credentials(root_certificates=pem)


def add_port(server: grpc.aio.Server, address: str, *, cert_path: str | None = None,
             key_path: str | None = None) -> int:
    """Bind ``address``: TLS with ``cert_path``/``key_path`` (both or neither), else plaintext.

    Returns the bound port (0 when gRPC could not bind), like ``add_*_port``.
    """
    if (cert_path is None) != (key_path is None):
        raise SecurityConfigError("TLS needs both a certificate and a private key file (or neither)")
    if cert_path is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(cert_path, key_path))  # type: ignore[arg-type]


# --------------------------------------------------------------- interceptor
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _deny_handler(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that ends the call UNAUTHENTICATED without running it."""

    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    # No deserializer: an unauthenticated request stays raw bytes and is never parsed.
    kw: dict[str, Any] = {"request_deserializer": None, "response_serializer": None}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        # grpc.aio awaits a non-generator coroutine as a streaming handler: abort ends the stream.
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>`` metadata.

    ``public_methods`` (full method names, ``/package.Service/Method``) need
    no token; the default opens health checks and server reflection.
    Missing metadata ends ``UNAUTHENTICATED`` "missing authorization
    metadata"; anything else that is not the token, "invalid bearer token"
    (the presented value is never echoed or logged).
    """

    def __init__(self, token: str, *, public_methods: Iterable[str] = DEFAULT_PUBLIC_METHODS) -> None:
        self._token = _check_token(token).encode()
        self.public_methods = frozenset(public_methods)

    def __repr__(self) -> str:
        return f"BearerTokenInterceptor(public_methods={sorted(self.public_methods)})"

    def verdict(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None if ``metadata`` carries the token, else why the call is denied."""
        value = next((v for k, v in (metadata or ()) if k.lower() == AUTH_KEY), None)
        if value is None:
            return MISSING
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, presented = str(value).strip().partition(" ")
        if scheme.lower() != "bearer":
            return INVALID
        presented_b = presented.strip().encode("utf-8", "replace")
        return None if hmac.compare_digest(presented_b, self._token) else INVALID

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method in self.public_methods:
            return await continuation(handler_call_details)
        why = self.verdict(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)  # only a lookup: the method does not run
        if why is None or handler is None:  # an unknown method ends UNIMPLEMENTED either way
            return handler
        log.info("denied %s: %s", method, why)
        return _deny_handler(handler, why)


def auth_interceptors(token: str | None, *,
                      public_methods: Iterable[str] = DEFAULT_PUBLIC_METHODS) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors for ``token``: none when it is None (no authentication)."""
    return [] if token is None else [BearerTokenInterceptor(token, public_methods=public_methods)]
