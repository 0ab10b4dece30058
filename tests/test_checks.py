"""System checks: instances.E001 (no instance server), E002 (no broker), E003 (unusable
mTLS files, W002 an expired server certificate), E004 (a bad seed)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from instances.checks import check_broker, check_instance_binary, check_mtls_files, check_seeds
from teimanager.config import MtlsConfig
from tests.conftest import ROOT, TEST_ENV
from tests.localtei_fixtures import free_port
from tests.test_multiplexer_tls import issue, make_ca


def test_it_is_quiet_when_localtei_is_importable(settings: Any) -> None:
    assert check_instance_binary(None) == []


def test_it_accepts_an_executable_tei_binary(settings: Any, tmp_path: Path) -> None:
    binary = tmp_path / "text-embeddings-router"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(binary))
    with mock.patch("importlib.util.find_spec", return_value=None):
        assert check_instance_binary(None) == []


def test_it_reports_e001_without_binary_and_localtei(settings: Any, tmp_path: Path) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(tmp_path / "missing"))
    with mock.patch("importlib.util.find_spec", return_value=None):
        [error] = check_instance_binary(None)
    assert error.id == "instances.E001"
    assert "TEI_BINARY_PATH" in error.msg


def test_it_warns_when_tei_binary_path_is_not_executable(settings: Any, tmp_path: Path) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(tmp_path / "missing"))
    [warning] = check_instance_binary(None)
    assert warning.id == "instances.W001"


def test_it_reports_e002_without_a_broker(settings: Any) -> None:
    settings.CELERY_BROKER_URL = ""
    [error] = check_broker(None)
    assert error.id == "instances.E002"
    assert "CELERY_BROKER_URL" in error.msg
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"
    assert check_broker(None) == []


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "check-ca")
    server = issue(directory, ca, "localhost", server=True)
    other = issue(directory, ca, "someone-else")
    encrypted = directory / "encrypted.key"
    key = serialization.load_pem_private_key(Path(server.key).read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    garbage = directory / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return {
        "ca": ca[0].cert,
        "cert": server.cert,
        "key": server.key,
        "other_key": other.key,
        "encrypted": str(encrypted),
        "garbage": str(garbage),
        "dir": str(directory),
    }


def use_mtls(settings: Any, ca_cert: str, server_cert: str, server_key: str) -> None:
    mtls = MtlsConfig(ca_cert=ca_cert, server_cert=server_cert, server_key=server_key)
    settings.TEI = dataclasses.replace(settings.TEI, mtls=mtls)


def test_it_is_quiet_without_mtls_or_with_good_files(settings: Any, pki: dict[str, str]) -> None:
    assert check_mtls_files(None) == []
    use_mtls(settings, pki["ca"], pki["cert"], pki["key"])
    assert check_mtls_files(None) == []


@pytest.mark.parametrize(
    ("files", "key", "says"),
    [
        (("missing", "cert", "key"), "ca_cert", "does not exist"),
        (("ca", "dir", "key"), "server_cert", "cannot be read"),
        (("ca", "garbage", "key"), "server_cert", "is not a PEM certificate"),
        (("ca", "cert", "garbage"), "server_key", "is not an unencrypted PEM private key"),
        (("ca", "cert", "encrypted"), "server_key", "is encrypted"),
        (("ca", "cert", "other_key"), "server_key", "is not the key of 'auth.mtls.server_cert'"),
    ],
)
def test_it_reports_e003_for_each_unusable_mtls_file(
    settings: Any, pki: dict[str, str], files: tuple[str, str, str], key: str, says: str
) -> None:
    paths = {**pki, "missing": pki["dir"] + "/missing.crt"}
    use_mtls(settings, *(paths[name] for name in files))
    [error] = check_mtls_files(None)
    assert error.id == "instances.E003"
    assert f"'auth.mtls.{key}'" in error.msg and says in error.msg


def test_it_warns_of_an_expired_server_certificate(settings: Any, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "old.crt", tmp_path / "old.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    use_mtls(settings, str(cert_path), str(cert_path), str(key_path))
    [warning] = check_mtls_files(None)
    assert warning.id == "instances.W002" and "expired" in warning.msg


def test_runmultiplexer_refuses_unusable_mtls_files_without_a_traceback(
    tmp_path: Path, pki: dict[str, str]
) -> None:
    config = tmp_path / "mtls.toml"
    config.write_text(
        f"[auth.mtls]\nca_cert = {pki['ca']!r}\nserver_cert = {pki['cert']!r}\n"
        f"server_key = {str(tmp_path / 'no-such.key')!r}\n"
    )
    env = {**os.environ, **TEST_ENV, "TEI_MANAGER_CONFIG": str(config)}
    result = subprocess.run(
        [sys.executable, "manage.py", "runmultiplexer", "--port", str(free_port()),
         "--metrics-port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "instances.E003" in result.stderr and "server_key" in result.stderr
    assert "Traceback" not in result.stderr
    assert "is now running" not in result.stdout


def test_it_reports_e004_for_a_seed_the_create_api_would_refuse(settings: Any) -> None:
    good = {"name": "a", "model_id": "m", "auto_truncate": False}
    settings.TEI = dataclasses.replace(settings.TEI, instances=(good,))
    assert check_seeds(None) == []
    bad = {"name": "b", "model_id": "m", "extra_args": ["--port=1"]}
    settings.TEI = dataclasses.replace(settings.TEI, instances=(good, bad))
    [error] = check_seeds(None)
    assert error.id == "instances.E004"
    expected = "config key 'instances[1].extra_args': --port is set by the manager"
    assert error.msg.startswith(expected)
