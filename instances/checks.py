"""System checks: what is missing before anything starts (`manage.py check`, migrate,
runmultiplexer, ...): E001 no instance server, E002 no broker, E003 unusable mTLS files,
E004 a bad `[[instances]]` seed."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from django.conf import settings
from django.core.checks import Error, Warning, register

from instances.launch import is_executable
from teimanager.config import ConfigError


@register()
def check_instance_binary(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    path = settings.TEI.tei_binary_path
    if is_executable(path):
        return []
    if importlib.util.find_spec("localtei") is not None:
        if path:
            message = f"TEI_BINARY_PATH={path} is not an executable file; localtei is used"
            return [Warning(message, id="instances.W001")]
        return []
    return [
        Error(
            "No instance server: TEI_BINARY_PATH does not point at an executable "
            "text-embeddings-router and the localtei package cannot be imported.",
            hint="Install TEI's gRPC router and set TEI_BINARY_PATH, or run from the "
            "project checkout so that `python -m localtei` works.",
            id="instances.E001",
        )
    ]


@register()
def check_broker(app_configs: Any, **kwargs: Any) -> list[Error]:
    url = settings.CELERY_BROKER_URL
    if url and "://" in url:
        return []
    return [
        Error(
            f"CELERY_BROKER_URL is {'not a URL: ' + repr(url) if url else 'not set'}: "
            "the worker and beat cannot run without a broker.",
            hint="Set CELERY_BROKER_URL, e.g. redis://127.0.0.1:6379/0 (`make redis` starts one).",
            id="instances.E002",
        )
    ]


@register()
def check_mtls_files(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    """`[auth.mtls]`: each file exists, is readable and is PEM; the key fits the cert."""
    mtls = settings.TEI.mtls
    if not (mtls.ca_cert or mtls.server_cert or mtls.server_key):
        return []
    problems: list[Error | Warning] = []
    certs = {}
    for name in ("ca_cert", "server_cert"):
        loaded = _load_pem(name, getattr(mtls, name), problems, _read_certificates)
        if loaded is not None:
            certs[name] = loaded
    key = _load_pem("server_key", mtls.server_key, problems, _read_private_key)
    if (
        key is not None
        and "server_cert" in certs
        and not _same_public_key(key, certs["server_cert"][0])
    ):
        problems.append(
            _mtls_error(
                f"config key 'auth.mtls.server_key' ({mtls.server_key}) is not the key of "
                f"'auth.mtls.server_cert' ({mtls.server_cert})",
                "Point server_key at the private key the server certificate was issued for.",
            )
        )
    if "server_cert" in certs:
        expires = certs["server_cert"][0].not_valid_after_utc
        if expires < datetime.now(UTC):
            problems.append(
                Warning(
                    f"config key 'auth.mtls.server_cert' ({mtls.server_cert}) expired on "
                    f"{expires:%Y-%m-%d}: clients will refuse the handshake.",
                    id="instances.W002",
                )
            )
    return problems


def _load_pem(
    name: str, path: str, problems: list[Error | Warning], parse: Callable[[bytes], Any]
) -> Any:
    label = f"config key 'auth.mtls.{name}' ({path})"
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        problems.append(_mtls_error(f"{label} does not exist"))
        return None
    except OSError as exc:
        problems.append(_mtls_error(f"{label} cannot be read: {exc.strerror}"))
        return None
    try:
        return parse(data)
    except TypeError:  # cryptography: "Password was not given but private key is encrypted"
        problems.append(_mtls_error(f"{label} is encrypted: gRPC needs it unencrypted"))
    except ValueError:
        problems.append(_mtls_error(f"{label} is not {_WHAT[name]}"))
    return None


_WHAT = {
    "ca_cert": "a PEM certificate",
    "server_cert": "a PEM certificate",
    "server_key": "an unencrypted PEM private key",
}


def _read_certificates(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def _read_private_key(data: bytes) -> Any:
    return serialization.load_pem_private_key(data, password=None)


def _same_public_key(key: Any, cert: x509.Certificate) -> bool:
    raw = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw))


def _mtls_error(message: str, hint: str = "") -> Error:
    return Error(
        message,
        hint=hint
        or "Fix the [auth.mtls] table of the config file; the multiplexer cannot "
        "serve TLS without it.",
        id="instances.E003",
    )


@register()
def check_seeds(app_configs: Any, **kwargs: Any) -> list[Error]:
    from instances.api.serializers import validate_seeds

    try:
        validate_seeds(settings.TEI.instances)
    except ConfigError as exc:
        return [
            Error(
                str(exc),
                hint="Each [[instances]] table of the config file takes the create API's "
                "fields (POST /instances), with the same rules.",
                id="instances.E004",
            )
        ]
    return []
