"""mTLS on the multiplexer, with a CA and certificates made at test time."""

from __future__ import annotations

import datetime
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from multiplexer.benchclient import text_batch
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from multiplexer.tls import channel_credentials
from teimanager.config import MtlsConfig
from tests.localtei_fixtures import free_port
from tests.test_multiplexer import run_benchclient

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass(frozen=True)
class Pem:
    cert: str
    key: str


def make_ca(directory: Path, name: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, name, cert, key), cert, key


def issue(
    directory: Path,
    ca: tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    server: bool = False,
) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = _builder(subject, ca[1].subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    issuer = ca[1].subject.rfc4514_string().removeprefix("CN=")
    return _write(directory, f"{issuer}-{common_name}", builder.sign(ca[2], hashes.SHA256()), key)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> Pem:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pem(str(cert_path), str(key_path))


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    allowed: Pem
    other_subject: Pem
    foreign: Pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "tei-test-ca")
    foreign_ca = make_ca(directory, "someone-elses-ca")
    return Pki(
        ca=ca[0],
        server=issue(directory, ca, "localhost", server=True),
        allowed=issue(directory, ca, "allowed-client"),
        other_subject=issue(directory, ca, "other-client"),
        foreign=issue(directory, foreign_ca, "allowed-client"),
    )


def mtls_server(pki: Pki, allowed_subjects: tuple[str, ...]) -> BackgroundMultiplexer:
    mtls = MtlsConfig(
        ca_cert=pki.ca.cert,
        server_cert=pki.server.cert,
        server_key=pki.server.key,
        allowed_subjects=allowed_subjects,
    )
    return BackgroundMultiplexer(ServerOptions(host="127.0.0.1", port=0, mtls=mtls))


@pytest.fixture(scope="module")
def guarded(pki: Pki) -> Iterator[BackgroundMultiplexer]:
    with mtls_server(pki, ("allowed-client",)) as background:
        yield background


@pytest.fixture
def noop_target(guarded: BackgroundMultiplexer) -> str:
    """A running row the noop Arrow path routes to (and never calls)."""
    from instances.models import Instance

    Instance.objects.create(
        name="noop-target",
        model_id="x/noop",
        port=free_port(),
        prometheus_port=4,
        status="running",
        node="multiplexer-tests",
    )
    router = guarded.server.router  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while "noop-target" not in router.table.by_name:
        assert time.monotonic() < deadline, "the multiplexer did not see the row"
        time.sleep(0.02)
    return "noop-target"


def secure_channel(port: int, ca: str, client: Pem | None) -> grpc.Channel:
    credentials = channel_credentials(
        ca, client.cert if client else None, client.key if client else None
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def health_check(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


def refusal(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        health_check(channel)
    return caught.value


def test_it_accepts_a_client_with_an_allowed_certificate(
    pki: Pki, guarded: BackgroundMultiplexer, noop_target: str
) -> None:
    port = guarded.server.port  # type: ignore[union-attr]
    with secure_channel(port, pki.ca.cert, pki.allowed) as channel:
        assert health_check(channel).status == health_pb2.HealthCheckResponse.SERVING
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        reply = stub.EmbedArrow(
            mux.EmbedArrowRequest(
                target=mux.Target(instance_name=noop_target),
                arrow_ipc=text_batch(["a"]),
                noop=True,
            ),
            timeout=5,
        )
        assert reply.arrow_ipc


def test_it_refuses_a_client_without_a_certificate(
    pki: Pki, guarded: BackgroundMultiplexer
) -> None:
    port = guarded.server.port  # type: ignore[union-attr]
    with secure_channel(port, pki.ca.cert, None) as channel:
        assert refusal(channel).code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plaintext:
        assert refusal(plaintext).code() == grpc.StatusCode.UNAVAILABLE


def test_it_refuses_a_certificate_from_another_ca(pki: Pki, guarded: BackgroundMultiplexer) -> None:
    port = guarded.server.port  # type: ignore[union-attr]
    with secure_channel(port, pki.ca.cert, pki.foreign) as channel:
        assert refusal(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_it_refuses_a_subject_that_is_not_allowed(
    pki: Pki, guarded: BackgroundMultiplexer, noop_target: str
) -> None:
    port = guarded.server.port  # type: ignore[union-attr]
    with secure_channel(port, pki.ca.cert, pki.other_subject) as channel:
        error = refusal(channel)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'other-client' is not allowed" in error.details()
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Info(mux.InfoRequest(target=mux.Target(instance_name=noop_target)), timeout=5)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_it_accepts_any_subject_of_the_ca_when_none_are_listed(pki: Pki) -> None:
    with mtls_server(pki, ()) as open_to_the_ca:
        port = open_to_the_ca.server.port  # type: ignore[union-attr]
        with secure_channel(port, pki.ca.cert, pki.other_subject) as channel:
            assert health_check(channel).status == health_pb2.HealthCheckResponse.SERVING
        with secure_channel(port, pki.ca.cert, pki.foreign) as channel:
            assert refusal(channel).code() == grpc.StatusCode.UNAVAILABLE


def test_it_has_a_benchmark_client_that_speaks_mtls(
    pki: Pki, guarded: BackgroundMultiplexer, noop_target: str
) -> None:
    port = guarded.server.port  # type: ignore[union-attr]
    report, _ = run_benchclient(
        "-e", f"https://localhost:{port}", "-i", noop_target, "--mode", "arrow", "--noop",
        "--num-texts", "50", "--batch-size", "20",
        "--cert", pki.allowed.cert, "--key", pki.allowed.key, "--ca", pki.ca.cert,
    )  # fmt: skip
    assert (report["successful"], report["failed"], report["num_requests"]) == (50, 0, 3)


def test_mtls_and_keys_combine(pki: Pki, guarded: BackgroundMultiplexer, noop_target: str) -> None:
    from access import keys

    secret = keys.create_key("tls-app", ["inference"]).secret
    keyring = guarded.server.keyring  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while not keyring.table.any_key:
        assert time.monotonic() < deadline, "the multiplexer did not see the key"
        time.sleep(0.02)
    request = mux.EmbedArrowRequest(
        target=mux.Target(instance_name=noop_target), arrow_ipc=text_batch(["a"]), noop=True
    )
    port = guarded.server.port  # type: ignore[union-attr]
    with secure_channel(port, pki.ca.cert, pki.allowed) as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        with pytest.raises(grpc.RpcError) as no_key:  # a good certificate is not enough
            stub.EmbedArrow(request, timeout=5)
        assert no_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {secret}"),)
        assert stub.EmbedArrow(request, timeout=5, metadata=metadata).arrow_ipc
    with secure_channel(port, pki.ca.cert, pki.other_subject) as channel:  # nor a good key
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        with pytest.raises(grpc.RpcError) as no_subject:
            stub.EmbedArrow(request, timeout=5, metadata=metadata)
        assert no_subject.value.code() == grpc.StatusCode.PERMISSION_DENIED
