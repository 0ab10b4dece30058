"""The generated SECRET_KEY: one random key per state directory, kept in a file beside the
state file, so sessions and CSRF tokens survive a restart without a constant in the code.

Several processes (web workers, the worker, beat) start at once and must agree on one key:
each writes its candidate to a private temporary file and `link()`s it to the final name,
which succeeds for exactly one of them; the others read the winner's key."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

FILE_NAME = "secret_key"


class SecretKeyError(Exception):
    """The key file cannot be read or written; the message says where."""


def load_or_create(directory: Path) -> str:
    """The key stored in `directory`, created (mode 0600) when there is none yet."""
    path = directory / FILE_NAME
    try:
        key = _read(path)
        if key is None:
            directory.mkdir(parents=True, exist_ok=True)
            _create(path)
            key = _read(path)
    except OSError as exc:
        raise SecretKeyError(f"cannot read or create {path}: {exc.strerror or exc}") from None
    if not key:
        raise SecretKeyError(f"{path} is empty: delete it to generate a new key, or set SECRET_KEY")
    return key


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _create(path: Path) -> None:
    fd, candidate = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        # link() never replaces an existing file: the first process to get here wins.
        with contextlib.suppress(FileExistsError):
            os.link(candidate, path)
    finally:
        os.unlink(candidate)
