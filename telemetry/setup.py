"""What each process calls once, as it starts: name itself in the logs, and trace when
OTEL_EXPORTER_OTLP_ENDPOINT says where to."""

from __future__ import annotations

from django.conf import settings

from telemetry import logs, tracing


def setup_process(service: str) -> None:
    """`service`: web, worker, beat or multiplexer."""
    logs.set_service(service)
    tracing.configure(f"tei-manager-{service}", settings.TEI.otlp_endpoint)
