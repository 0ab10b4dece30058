"""A load generator for the multiplexer: standard (one text per Embed call, `batch_size`
calls in flight) or Arrow (`batch_size` texts per EmbedArrow call, one call at a time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import pyarrow as pa
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2, multiplexer_pb2_grpc

from multiplexer.tls import channel_credentials

TEMPLATES = (
    "The quick brown fox jumps over the lazy dog",
    "Machine learning models can process natural language efficiently",
    "Embedding vectors capture semantic meaning in high-dimensional space",
    "Text retrieval systems rely on similarity search algorithms",
    "Neural networks transform input data through multiple layers",
    "Vector databases enable fast approximate nearest neighbor search",
    "Semantic search improves information retrieval accuracy",
    "Language models understand context and generate coherent text",
    "Transformers revolutionized natural language processing",
    "Attention mechanisms help models focus on relevant information",
)

Progress = Callable[[int], object]


@dataclass
class BenchResult:
    mode: str
    instance_name: str
    num_texts: int
    batch_size: int
    num_requests: int
    total_duration_secs: float
    throughput_per_sec: float
    successful: int
    failed: int
    first_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        if not self.first_error:
            del result["first_error"]
        return result


@dataclass(frozen=True)
class Endpoint:
    address: str
    tls: bool
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False
    max_message_size_mb: int = 100

    @classmethod
    def parse(cls, endpoint: str, **options: Any) -> Endpoint:
        tls = endpoint.startswith("https://") or bool(options.get("ca") or options.get("cert"))
        address = endpoint.split("://", 1)[-1].rstrip("/")
        return cls(address=address, tls=tls, **options)

    def channel(self) -> grpc.aio.Channel:
        size = self.max_message_size_mb * 1024 * 1024
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
        ]
        if not self.tls:
            return grpc.aio.insecure_channel(self.address, options=options)
        if self.insecure:
            # Certificates issued for localhost, reached by another name or address.
            options.append(("grpc.ssl_target_name_override", "localhost"))
        credentials = channel_credentials(self.ca, self.cert, self.key)
        return grpc.aio.secure_channel(self.address, credentials, options=options)


def generate_texts(count: int) -> list[str]:
    texts = []
    for i in range(count):
        text = f"{TEMPLATES[i % len(TEMPLATES)]} - sample {i + 1}"
        if i % 3 == 0:
            text += " with additional context for testing variable length inputs"
        texts.append(text)
    return texts


async def run_standard(
    endpoint: Endpoint,
    instance: str,
    texts: list[str],
    concurrency: int,
    progress: Progress | None = None,
) -> BenchResult:
    target = multiplexer_pb2.Target(instance_name=instance)
    outcome = _Outcome()
    async with endpoint.channel() as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        queue = iter(texts)

        async def worker() -> None:
            for text in queue:
                request = multiplexer_pb2.EmbedRequest(
                    target=target,
                    request=tei_pb2.EmbedRequest(inputs=text, truncate=True, normalize=True),
                )
                try:
                    await stub.Embed(request)
                    outcome.ok(1)
                except grpc.aio.AioRpcError as exc:
                    outcome.fail(1, exc)
                if progress:
                    progress(1)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        elapsed = time.perf_counter() - started
    return outcome.result("standard", instance, len(texts), concurrency, len(texts), elapsed)


async def run_arrow(
    endpoint: Endpoint,
    instance: str,
    texts: list[str],
    batch_size: int,
    noop: bool = False,
    progress: Progress | None = None,
) -> BenchResult:
    target = multiplexer_pb2.Target(instance_name=instance)
    outcome = _Outcome()
    batch_size = max(1, batch_size)
    chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    async with endpoint.channel() as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        started = time.perf_counter()
        for chunk in chunks:
            request = multiplexer_pb2.EmbedArrowRequest(
                target=target, arrow_ipc=text_batch(chunk), truncate=True, normalize=True, noop=noop
            )
            try:
                reply = await stub.EmbedArrow(request)
                rows = pa.ipc.open_stream(pa.py_buffer(reply.arrow_ipc)).read_all().num_rows
                outcome.ok(rows)
                outcome.fail(len(chunk) - rows, None)
            except grpc.aio.AioRpcError as exc:
                outcome.fail(len(chunk), exc)
            if progress:
                progress(len(chunk))
        elapsed = time.perf_counter() - started
    return outcome.result("arrow", instance, len(texts), batch_size, len(chunks), elapsed)


def text_batch(texts: list[str]) -> bytes:
    """An LZ4_FRAME-compressed Arrow IPC stream with one `text` column."""
    table = pa.table({"text": pa.array(texts, pa.string())})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class _Outcome:
    def __init__(self) -> None:
        self.successful = 0
        self.failed = 0
        self.first_error = ""

    def ok(self, count: int) -> None:
        self.successful += count

    def fail(self, count: int, exc: grpc.aio.AioRpcError | None) -> None:
        self.failed += count
        if count and exc is not None and not self.first_error:
            self.first_error = f"{exc.code().name}: {exc.details()}"

    def result(
        self, mode: str, instance: str, texts: int, batch: int, requests: int, elapsed: float
    ) -> BenchResult:
        return BenchResult(
            mode=mode,
            instance_name=instance,
            num_texts=texts,
            batch_size=batch,
            num_requests=requests,
            total_duration_secs=round(elapsed, 4),
            throughput_per_sec=round(self.successful / elapsed, 2) if elapsed else 0.0,
            successful=self.successful,
            failed=self.failed,
            first_error=self.first_error,
        )
