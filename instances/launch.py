"""The launch contract: the flags the manager sets, the command line, the environment.

`MANAGED_FLAGS` is the one list of flags the manager owns. `build_command` writes each of
them from the instance's row, and create validation (`refuse_managed_flags`) refuses any of
them, in any spelling, in `extra_args`: a second copy would override the row (a `-p` the
database does not know, an `--auto-truncate` the row says is off).

The environment is built, not inherited: text-embeddings-router reads every flag from an
environment variable of the same name (`PORT`, `HOSTNAME`, `POOLING`, `API_KEY`, ...),
so a stray one in the manager's environment would silently change an instance. Only what
a server process needs passes (`PASSED_ENV`, `PASSED_ENV_PREFIXES`), plus what the
manager sets: the instance's own key as API_KEY (never `--api-key`: a command line is
visible to every user of the host in `ps`, an environment only to the process's owner).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from instances.models import Instance

BASE_DIR = Path(__file__).resolve().parent.parent

# What a flag is set to: None leaves it out, True writes the bare flag.
FlagValue = str | bool | None


@dataclass(frozen=True)
class ManagedFlag:
    name: str
    value: Callable[[Instance, str], FlagValue]  # (instance, bind address) -> value
    source: str  # where the manager takes it from, for the error that refuses it
    aliases: tuple[str, ...] = ()  # short spellings, e.g. "-p"

    def spelling_in(self, arg: str) -> str | None:
        """How `arg` names this flag, if it does: `--port`, `--port=1`, `-p`, `-p1`, `-p=1`."""
        if arg == self.name or arg.startswith(self.name + "="):
            return self.name
        if arg.startswith("--") or not arg.startswith("-"):
            return None
        # A short option may carry its value (`-p19150`) or end a cluster (`-xp 1`).
        cluster = arg[1:].split("=", 1)[0]
        return next((alias for alias in self.aliases if alias[1] in cluster), None)


# In the order they appear on the command line. `--auto-truncate` is written only when on:
# when off, the environment says AUTO_TRUNCATE=false (older routers take no value after
# the flag; every version reads the variable).
MANAGED_FLAGS: tuple[ManagedFlag, ...] = (
    ManagedFlag("--model-id", lambda i, b: i.model_id, "the model_id field"),
    ManagedFlag("--hostname", lambda i, b: b, "TEI_MANAGER_INSTANCE_BIND"),
    ManagedFlag("--port", lambda i, b: str(i.port), "the port field", aliases=("-p",)),
    ManagedFlag(
        "--max-batch-tokens", lambda i, b: str(i.max_batch_tokens), "the max_batch_tokens field"
    ),
    ManagedFlag(
        "--max-concurrent-requests",
        lambda i, b: str(i.max_concurrent_requests),
        "the max_concurrent_requests field",
    ),
    ManagedFlag("--json-output", lambda i, b: True, "always on: the manager reads the log"),
    ManagedFlag(
        "--prometheus-port", lambda i, b: str(i.prometheus_port), "the prometheus_port field"
    ),
    ManagedFlag("--pooling", lambda i, b: i.pooling or None, "the pooling field"),
    ManagedFlag(
        "--auto-truncate", lambda i, b: True if i.auto_truncate else None, "the auto_truncate field"
    ),
    # Set through the environment (API_KEY), never on the command line.
    ManagedFlag("--api-key", lambda i, b: None, "the instance's own key, passed as API_KEY"),
    # Reserved: a pinned GPU is the only device CUDA_VISIBLE_DEVICES shows, device 0.
    ManagedFlag("--device-id", lambda i, b: None, "the gpu_id field: a pinned GPU is device 0"),
)

# Every flag of text-embeddings-router (`--help`); each is also read from the environment
# variable of the same name in upper case (`--max-batch-tokens` <- MAX_BATCH_TOKENS).
ROUTER_FLAGS = (
    "--model-id",
    "--revision",
    "--tokenization-workers",
    "--dtype",
    "--served-model-name",
    "--pooling",
    "--max-concurrent-requests",
    "--max-batch-tokens",
    "--max-batch-requests",
    "--max-client-batch-size",
    "--auto-truncate",
    "--default-prompt-name",
    "--default-prompt",
    "--dense-path",
    "--device-id",
    "--hf-api-token",
    "--hf-token",
    "--hostname",
    "--port",
    "--uds-path",
    "--huggingface-hub-cache",
    "--payload-limit",
    "--api-key",
    "--json-output",
    "--disable-spans",
    "--otlp-endpoint",
    "--otlp-service-name",
    "--prometheus-port",
    "--cors-allow-origin",
)


def flag_env_name(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_").upper()


FLAG_ENV_NAMES = frozenset(flag_env_name(flag) for flag in ROUTER_FLAGS)
# Flag variables that are the Hugging Face hub's own settings, with the same meaning to
# the router as to every other hub client: they pass like the rest of HF_*.
HUB_SETTINGS = frozenset({"HF_TOKEN", "HF_API_TOKEN", "HUGGINGFACE_HUB_CACHE"})

# What an instance needs from the manager's environment: the system (PATH, HOME, locale,
# temporary files, libraries), the GPU, the Hugging Face hub and its proxy and CA settings,
# logging, thread counts and localtei's own settings.
PASSED_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "LD_LIBRARY_PATH",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "LOG_LEVEL",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
    }
)
PASSED_ENV_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "LC_", "LOCALTEI_")


def is_executable(path: str) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def binary_command(tei_binary_path: str) -> list[str]:
    """The router when TEI_BINARY_PATH points at an executable, localtei otherwise."""
    if is_executable(tei_binary_path):
        return [tei_binary_path]
    return [sys.executable, "-m", "localtei"]


def build_command(instance: Instance, tei_binary_path: str, bind: str | None = None) -> list[str]:
    """The command line: the managed flags from the row, then its `extra_args`.

    Raises LaunchContractError when an extra argument names a managed flag (a row written
    before validation refused them): launching it would serve something the row does not say.
    """
    bind = bind or settings.TEI.instance_bind
    command = binary_command(tei_binary_path)
    for flag in MANAGED_FLAGS:
        value = flag.value(instance, bind)
        if value is True:
            command.append(flag.name)
        elif value:
            command += [flag.name, value]
    extra = [str(arg) for arg in instance.extra_args]
    refusal = refuse_managed_flags(extra)
    if refusal is not None:
        raise LaunchContractError(f"extra_args: {refusal}")
    return command + extra


def refuse_managed_flags(args: Iterable[str]) -> str | None:
    """Why `args` cannot be extra arguments (the first that sets a managed flag), or None."""
    for arg in args:
        for flag in MANAGED_FLAGS:
            spelling = flag.spelling_in(arg)
            if spelling is not None:
                return f"{spelling} is set by the manager ({flag.source})"
    return None


def build_env(instance: Instance) -> dict[str, str]:
    """The instance's environment: what passes from ours, plus what the manager sets."""
    env = {name: value for name, value in os.environ.items() if passes(name)}
    if instance.gpu_id is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(instance.gpu_id)
    if not instance.auto_truncate:
        env["AUTO_TRUNCATE"] = "false"
    if instance.api_key:
        # TEI and localtei read --api-key from API_KEY: calls without it are refused.
        env["API_KEY"] = instance.api_key
    # localtei is a package of this checkout: make it importable from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(BASE_DIR), str(BASE_DIR / "proto"), os.environ.get("PYTHONPATH")) if p
    )
    return env


def passes(name: str) -> bool:
    """True when the variable `name` of the manager's environment reaches an instance."""
    if name in FLAG_ENV_NAMES and name not in HUB_SETTINGS:
        return False
    return name in PASSED_ENV or name.startswith(PASSED_ENV_PREFIXES)


class LaunchContractError(ValueError):
    """An instance's row cannot be launched as it stands; the message says why."""
