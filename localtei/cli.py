"""`python -m localtei`: text-embeddings-router's command line, then the server.

Only argparse and the standard library are imported before the flags are checked, so a
bad flag fails in well under a second; torch is imported once the model is found.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from localtei.settings import BACKENDS, Settings
from localtei.spec import POOLINGS

# int8: ONNX Runtime's dynamic quantization, on CPU.
_DTYPES = ("float32", "float16", "bfloat16", "int8")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    from localtei.logs import configure_logging

    configure_logging(settings.json_output)
    from localtei.server import run

    return run(settings)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Flags as TEI spells them; each falls back to TEI's environment variable."""
    parser = argparse.ArgumentParser(
        prog="python -m localtei",
        description="A TEI-compatible gRPC embedding server (PyTorch + transformers).",
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--model-id", default=_env("MODEL_ID", "sentence-transformers/all-MiniLM-L6-v2"))
    add("--revision", default=_env("REVISION"))
    add("--tokenization-workers", type=int, default=_env_int("TOKENIZATION_WORKERS"))
    add("--dtype", choices=_DTYPES, default=_env("DTYPE"))
    add("--pooling", choices=POOLINGS, default=_env("POOLING"))
    # Not a TEI flag: ONNX Runtime on CPU and torch on CUDA by default.
    add("--backend", choices=BACKENDS, default=_env("LOCALTEI_BACKEND", "auto"))
    add("--max-concurrent-requests", type=int, default=_env_int("MAX_CONCURRENT_REQUESTS", 512))
    add("--max-batch-tokens", type=int, default=_env_int("MAX_BATCH_TOKENS", 16384))
    add("--max-batch-requests", type=int, default=_env_int("MAX_BATCH_REQUESTS"))
    add("--max-client-batch-size", type=int, default=_env_int("MAX_CLIENT_BATCH_SIZE", 32))
    # `--auto-truncate`, or as newer routers also take it, `--auto-truncate false`.
    add(
        "--auto-truncate",
        nargs="?",
        type=_boolean,
        const=True,
        default=_env_bool("AUTO_TRUNCATE"),
        metavar="BOOL",
    )
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--default-prompt-name", default=_env("DEFAULT_PROMPT_NAME"))
    prompts.add_argument("--default-prompt", default=_env("DEFAULT_PROMPT"))
    # Like TEI: a container's HOSTNAME is its name, which is not an IP address, and then
    # the server listens on 0.0.0.0 (see server.py). The manager always passes --hostname.
    add("--hostname", default=_env("HOSTNAME", "0.0.0.0"))
    add("--port", "-p", type=int, default=_env_int("PORT", 3000))
    add("--huggingface-hub-cache", default=_env("HUGGINGFACE_HUB_CACHE"))
    add("--payload-limit", type=int, default=_env_int("PAYLOAD_LIMIT", 2_000_000))
    add("--api-key", default=_env("API_KEY"))
    add("--json-output", action="store_true", default=_env_bool("JSON_OUTPUT"))
    add("--prometheus-port", type=int, default=_env_int("PROMETHEUS_PORT", 9000))
    # Accepted for compatibility, from the flag or its variable; nothing here uses them.
    hidden = argparse.SUPPRESS
    add("--hf-api-token", default=_env("HF_API_TOKEN"), help=hidden)
    add("--hf-token", default=_env("HF_TOKEN"), help=hidden)
    add("--served-model-name", default=_env("SERVED_MODEL_NAME"), help=hidden)
    add("--device-id", type=int, default=_env_int("DEVICE_ID", 0), help=hidden)
    add("--disable-spans", action="store_true", default=_env_bool("DISABLE_SPANS"), help=hidden)
    add("--otlp-endpoint", default=_env("OTLP_ENDPOINT"), help=hidden)
    add("--otlp-service-name", default=_env("OTLP_SERVICE_NAME"), help=hidden)
    add("--cors-allow-origin", action="append", default=None, help=hidden)
    add("--dense-path", default=_env("DENSE_PATH"), help=hidden)
    add("--serverless", action="store_true", help=hidden)
    add("--uds-path", default=_env("UDS_PATH"), help=hidden)
    args = parser.parse_args(argv)
    _check_ranges(parser, args)
    return Settings(
        model_id=args.model_id,
        revision=args.revision,
        dtype=args.dtype,
        pooling=args.pooling,
        max_concurrent_requests=args.max_concurrent_requests,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_requests=args.max_batch_requests,
        max_client_batch_size=args.max_client_batch_size,
        auto_truncate=args.auto_truncate,
        tokenization_workers=args.tokenization_workers,
        default_prompt_name=args.default_prompt_name,
        default_prompt=args.default_prompt,
        hostname=args.hostname,
        port=args.port,
        prometheus_port=args.prometheus_port,
        json_output=args.json_output,
        huggingface_hub_cache=args.huggingface_hub_cache,
        api_key=args.api_key,
        payload_limit=args.payload_limit,
        backend=args.backend,
    )


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("max_concurrent_requests", "max_batch_tokens", "max_client_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_batch_requests is not None and args.max_batch_requests < 1:
        parser.error("--max-batch-requests must be at least 1")
    for name in ("port", "prometheus_port"):
        if not 0 <= getattr(args, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')} must be a port number (0-65535)")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        sys.exit(f"error: environment variable {name}={value!r} is not an integer")


def _env_bool(name: str) -> bool:
    value = os.environ.get(name, "")
    try:
        return _boolean(value) if value.strip() else False
    except argparse.ArgumentTypeError:
        sys.exit(f"error: environment variable {name}={value!r} is not a boolean")


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")
