"""TLS and bearer tokens on a real grpc.aio server (127.0.0.1) with a tiny servicer.

The server runs in its own event-loop thread so that both the blocking
``Client`` and the ``AsyncClient`` can call it from the test thread.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from protos import serving_pb2, serving_pb2_grpc
from router.client import AsyncClient, Client, cli_token
from router.client import main as cli_main
from router.security import (DEFAULT_PUBLIC_METHODS, BearerTokenInterceptor, SecurityConfigError, add_port,
                             auth_interceptors, auth_metadata, load_secret, server_credentials)

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-token-0123456789"
WRONG = "not-the-token-987654321"
SERVICE = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name


# ------------------------------------------------------------- certificates
def self_signed(dir_: Path, name: str, dns: list[str], ips: list[str]) -> tuple[str, str]:
    """A self-signed EC certificate and key (PEM files in ``dir_``) for these names."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = dir_ / f"{name}.crt", dir_ / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    d = tmp_path_factory.mktemp("certs")
    return {
        "server": self_signed(d, "server", ["localhost"], ["127.0.0.1"]),
        "named": self_signed(d, "named", ["router.splitserve.test"], []),
        "other": self_signed(d, "other", ["localhost"], ["127.0.0.1"]),
    }


# ------------------------------------------------------------------- server
class TinyServing(serving_pb2_grpc.ServingServicer):
    async def Generate(self, request, context):
        for i in range(3):
            yield serving_pb2.GenerateResponse(request_id="r", token_ids=[i], text=f"t{i}")
        yield serving_pb2.GenerateResponse(request_id="r", finish_reason=serving_pb2.FINISH_REASON_STOP)

    async def ClusterStatus(self, request, context):
        return serving_pb2.ClusterStatusResponse(model="tiny")


class ServerThread:
    """A grpc.aio server with the interceptor and TLS, on its own loop thread."""

    def __init__(self, cert: str | None, key: str | None, token: str | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self._run(self._start(cert, key, token))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _start(self, cert: str | None, key: str | None, token: str | None) -> int:
        self.server = grpc.aio.server(interceptors=auth_interceptors(token))
        serving_pb2_grpc.add_ServingServicer_to_server(TinyServing(), self.server)
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        port = add_port(self.server, "127.0.0.1:0", cert_path=cert, key_path=key)
        await self.server.start()
        await hs.set("", health_pb2.HealthCheckResponse.SERVING)
        return port

    def stop(self) -> None:
        self._run(self.server.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def server(certs) -> Iterator[ServerThread]:
    s = ServerThread(*certs["server"], TOKEN)
    yield s
    s.stop()


@pytest.fixture
def address(server: ServerThread) -> str:
    return f"127.0.0.1:{server.port}"


def client(address: str, certs, **kw) -> Client:
    return Client(address, timeout_s=10, tls_ca=certs["server"][0], **kw)


# -------------------------------------------------------------------- TLS
def test_tls_client_with_the_ca_and_token_works_unary_and_streaming(address: str, certs) -> None:
    c = client(address, certs, token=TOKEN)
    try:
        assert c.status().model == "tiny"
        out = c.generate("hi")
        assert out.token_ids == [0, 1, 2] and out.text == "t0t1t2" and out.finish_reason == "stop"
        assert c.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        c.close()


def test_ca_given_as_pem_text_works(address: str, certs) -> None:
    c = Client(address, timeout_s=10, tls_ca=Path(certs["server"][0]).read_text(), token=TOKEN)
    try:
        assert c.status().model == "tiny"
    finally:
        c.close()


def test_plaintext_client_fails(address: str) -> None:
    c = Client(address, timeout_s=5, token=TOKEN)
    try:
        with pytest.raises(grpc.RpcError) as e:
            c.status()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        c.close()


def test_client_trusting_another_ca_fails(address: str, certs) -> None:
    c = Client(address, timeout_s=5, tls_ca=certs["other"][0], token=TOKEN)
    try:
        with pytest.raises(grpc.RpcError) as e:
            c.status()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        c.close()


def test_server_name_override(certs) -> None:
    s = ServerThread(*certs["named"], TOKEN)  # its certificate names router.splitserve.test only
    address = f"127.0.0.1:{s.port}"
    try:
        c = Client(address, timeout_s=5, tls_ca=certs["named"][0], token=TOKEN)
        with pytest.raises(grpc.RpcError) as e:
            c.status()  # 127.0.0.1 is not in the certificate
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        c.close()
        c = Client(address, timeout_s=5, tls_ca=certs["named"][0], token=TOKEN, server_name="router.splitserve.test")
        assert c.status().model == "tiny"
        c.close()
    finally:
        s.stop()


def test_token_over_plaintext_on_loopback() -> None:
    s = ServerThread(None, None, TOKEN)
    try:
        good, anon = Client(f"127.0.0.1:{s.port}", timeout_s=5, token=TOKEN), Client(f"127.0.0.1:{s.port}", timeout_s=5)
        assert good.status().model == "tiny"
        with pytest.raises(grpc.RpcError) as e:
            anon.status()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good.close()
        anon.close()
    finally:
        s.stop()


def test_server_name_without_tls_is_refused() -> None:
    with pytest.raises(ValueError, match="TLS"):
        Client("127.0.0.1:1", server_name="x")


# ------------------------------------------------------------------ tokens
def test_no_token_is_unauthenticated_for_unary_and_streaming(address: str, certs) -> None:
    c = client(address, certs)
    try:
        with pytest.raises(grpc.RpcError) as e:
            c.status()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert e.value.details() == "missing authorization metadata"
        with pytest.raises(grpc.RpcError) as e:
            c.generate("hi")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert e.value.details() == "missing authorization metadata"
    finally:
        c.close()


def test_wrong_token_is_unauthenticated_and_not_echoed(address: str, certs, caplog) -> None:
    c = client(address, certs, token=WRONG)
    try:
        for call in (c.status, lambda: c.generate("hi")):
            with caplog.at_level(logging.DEBUG):
                with pytest.raises(grpc.RpcError) as e:
                    call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert e.value.details() == "invalid bearer token"
            assert WRONG not in str(e.value) and TOKEN not in str(e.value)
        assert WRONG not in caplog.text and TOKEN not in caplog.text
    finally:
        c.close()


def test_other_schemes_and_shapes_are_refused(address: str, certs) -> None:
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(certs["server"][0]).read_bytes()))
    stub = serving_pb2_grpc.ServingStub(channel)
    try:
        for value in (f"Basic {TOKEN}", TOKEN, "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
            with pytest.raises(grpc.RpcError) as e:
                stub.ClusterStatus(serving_pb2.ClusterStatusRequest(), timeout=5, metadata=(("authorization", value),))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
        ok = stub.ClusterStatus(serving_pb2.ClusterStatusRequest(), timeout=5,
                                metadata=(("authorization", f"bearer  {TOKEN} "),))  # scheme case, spaces
        assert ok.model == "tiny"
    finally:
        channel.close()


def test_unauthenticated_requests_are_not_parsed(address: str, certs) -> None:
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(certs["server"][0]).read_bytes()))
    raw = channel.unary_unary(f"/{SERVICE}/ClusterStatus")  # bytes in, bytes out
    try:
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff not protobuf", timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED  # denied before any parsing
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff not protobuf", timeout=5, metadata=auth_metadata(TOKEN))
        assert e.value.code() != grpc.StatusCode.UNAUTHENTICATED  # with the token it is parsed, and fails
    finally:
        channel.close()


def test_health_and_reflection_need_no_token(address: str, certs) -> None:
    c = client(address, certs)
    try:
        assert c.health() == health_pb2.HealthCheckResponse.SERVING
        c.wait_ready(timeout_s=5)
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
        names = {s.name for s in replies[0].list_services_response.service}
        assert SERVICE in names
    finally:
        c.close()


def test_async_client(address: str, certs) -> None:
    async def go() -> None:
        good = AsyncClient(address, timeout_s=10, tls_ca=certs["server"][0], token=TOKEN)
        bad = AsyncClient(address, timeout_s=10, tls_ca=certs["server"][0], token=WRONG)
        anon = AsyncClient(address, timeout_s=10, tls_ca=certs["server"][0])
        try:
            assert (await good.status()).model == "tiny"
            assert (await good.generate("hi")).token_ids == [0, 1, 2]
            assert await anon.health() == health_pb2.HealthCheckResponse.SERVING
            for call in (bad.status(), bad.generate("hi"), anon.generate("hi")):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            for c in (good, bad, anon):
                await c.close()

    asyncio.run(go())


def test_cli_with_tls_and_token(address: str, certs, tmp_path: Path, monkeypatch, capsys) -> None:
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    tok.chmod(0o600)
    monkeypatch.delenv("SPLITSERVE_TOKEN", raising=False)
    assert cli_main(["--address", address, "--tls-ca", certs["server"][0], "--status"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli_main(["--address", address, "--tls-ca", certs["server"][0], "--token-file", str(tok), "--status"]) == 0
    assert "tiny" in capsys.readouterr().out
    monkeypatch.setenv("SPLITSERVE_TOKEN", TOKEN)
    assert cli_main(["--address", address, "--tls-ca", certs["server"][0], "--status"]) == 0
    assert cli_main(["--address", address, "--token-file", str(tmp_path / "nope"), "--status"]) == 2
    assert "nope" in capsys.readouterr().err


def test_interceptor_arguments() -> None:
    with pytest.raises(SecurityConfigError):
        BearerTokenInterceptor("")
    with pytest.raises(SecurityConfigError):
        BearerTokenInterceptor("has space")
    i = BearerTokenInterceptor(TOKEN, public_methods=["/x.Y/Z"])
    assert i.public_methods == {"/x.Y/Z"} and TOKEN not in repr(i)
    assert "/grpc.health.v1.Health/Check" in DEFAULT_PUBLIC_METHODS
    assert i.verdict(auth_metadata(TOKEN)) is None
    assert i.verdict(()) == "missing authorization metadata"
    assert auth_metadata(None) == ()
    assert auth_interceptors(None) == [] and isinstance(auth_interceptors(TOKEN)[0], BearerTokenInterceptor)


def test_add_port_needs_both_cert_and_key(certs) -> None:
    async def go() -> None:
        server = grpc.aio.server()
        with pytest.raises(SecurityConfigError, match="both"):
            add_port(server, "127.0.0.1:0", cert_path=certs["server"][0])
        assert add_port(server, "127.0.0.1:0") > 0  # plaintext
        await server.stop(None)

    asyncio.run(go())


# -------------------------------------------------------------- load_secret
def test_load_secret_from_env(monkeypatch) -> None:
    monkeypatch.setenv("SS_TEST_SECRET", "  abc\n")
    assert load_secret(env="SS_TEST_SECRET", file=None) == "abc"
    monkeypatch.delenv("SS_TEST_SECRET")
    with pytest.raises(SecurityConfigError, match="SS_TEST_SECRET.*not set"):
        load_secret(env="SS_TEST_SECRET", file=None)
    monkeypatch.setenv("SS_TEST_SECRET", " \n")
    with pytest.raises(SecurityConfigError, match="SS_TEST_SECRET.*empty"):
        load_secret(env="SS_TEST_SECRET", file=None)
    assert load_secret(env=None, file=None) is None


def test_load_secret_from_file(tmp_path: Path, caplog) -> None:
    p = tmp_path / "secret"
    p.write_text("hunter2-value\n")
    p.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert load_secret(env=None, file=str(p)) == "hunter2-value"
    assert not caplog.records
    p.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_secret(env=None, file=str(p)) == "hunter2-value"
    assert "readable by every user" in caplog.text and "hunter2-value" not in caplog.text
    with pytest.raises(SecurityConfigError, match="nope.*does not exist"):
        load_secret(env=None, file=str(tmp_path / "nope"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecurityConfigError, match="empty"):
        load_secret(env=None, file=str(tmp_path / "empty"))
    with pytest.raises(SecurityConfigError, match="not both"):
        load_secret(env="X", file=str(p))


def test_cli_token_sources(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SPLITSERVE_TOKEN", raising=False)
    assert cli_token(None) is None
    monkeypatch.setenv("SPLITSERVE_TOKEN", "from-env")
    assert cli_token(None) == "from-env"
    (tmp_path / "t").write_text("from-file")
    os.chmod(tmp_path / "t", 0o600)
    assert cli_token(str(tmp_path / "t")) == "from-file"  # the file wins


def test_server_credentials_errors(tmp_path: Path, certs) -> None:
    cert, key = certs["server"]
    assert server_credentials(cert, key) is not None
    with pytest.raises(SecurityConfigError, match="certificate.*missing.crt"):
        server_credentials(str(tmp_path / "missing.crt"), key)
    with pytest.raises(SecurityConfigError, match="private key.*missing.key"):
        server_credentials(cert, str(tmp_path / "missing.key"))
    (tmp_path / "junk.pem").write_text("not a pem")
    with pytest.raises(SecurityConfigError, match="junk.pem.*not PEM"):
        server_credentials(cert, str(tmp_path / "junk.pem"))
    with pytest.raises(SecurityConfigError, match="not PEM"):
        server_credentials(key, key)  # a key where the certificate belongs
