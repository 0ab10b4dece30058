"""Arrow IPC batch embedding: decode the `text` column, encode the embeddings.

Requests are Arrow IPC streams (LZ4_FRAME-compressed buffers accepted) with a `text`
column of utf8 or large_utf8. Dense replies carry `embeddings: FixedSizeList<float32, dim>`,
sparse replies `sparse_embeddings: List<Struct<index: uint32, value: float32>>`, one row per
input row in the same order, written LZ4_FRAME-compressed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from tei.v1 import tei_pb2

from multiplexer.wire import WireError, read_varint, skip_field

NOOP_DIMENSION = 384
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
_SPARSE_ITEM = pa.struct([("index", pa.uint32()), ("value", pa.float32())])


class ArrowInputError(ValueError):
    """The request's Arrow payload is unusable; the message says why."""


class InstanceReplyError(ValueError):
    """The instance answered with something that does not fit the reply (e.g. mixed sizes)."""


def read_texts(payload: bytes) -> list[str]:
    """The `text` column of an Arrow IPC stream, as Python strings, in row order."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
    except Exception as exc:
        raise ArrowInputError(f"arrow_ipc is not a readable Arrow IPC stream: {exc}") from None
    if "text" not in table.schema.names:
        columns = ", ".join(table.schema.names) or "none"
        raise ArrowInputError(f"the Arrow batch has no 'text' column (columns: {columns})")
    column = table.column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ArrowInputError(f"column 'text' must be utf8 or large_utf8, not {column.type}")
    if table.num_rows == 0:
        raise ArrowInputError("the Arrow batch has no rows")
    if column.null_count:
        raise ArrowInputError(f"column 'text' has {column.null_count} null value(s)")
    return column.to_pylist()


def dense_ipc(vectors: np.ndarray) -> bytes:
    """`embeddings: FixedSizeList<float32, dim>` for a (rows, dim) float32 matrix."""
    rows, dim = vectors.shape
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, dim)
    return _write(pa.record_batch([column], names=["embeddings"]))


def sparse_ipc(offsets: np.ndarray, indices: np.ndarray, values: np.ndarray) -> bytes:
    """`sparse_embeddings: List<Struct<index: uint32, value: float32>>` from flat arrays."""
    items = pa.StructArray.from_arrays(
        [pa.array(indices, pa.uint32()), pa.array(values, pa.float32())],
        fields=list(_SPARSE_ITEM),
    )
    column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items)
    return _write(pa.record_batch([column], names=["sparse_embeddings"]))


def noop_dense(rows: int) -> bytes:
    return dense_ipc(np.zeros((rows, NOOP_DIMENSION), dtype=np.float32))


def noop_sparse(rows: int) -> bytes:
    offsets = np.arange(rows + 1, dtype=np.int32)
    return sparse_ipc(offsets, np.zeros(rows, np.uint32), np.zeros(rows, np.float32))


def dense_from_replies(replies: Sequence[bytes]) -> np.ndarray:
    """Stack serialised EmbedResponses into a (rows, dim) matrix without a protobuf parse."""
    chunks = [_packed_embeddings(reply) for reply in replies]
    dim = len(chunks[0]) // 4 if chunks else 0
    if any(len(chunk) != dim * 4 for chunk in chunks):
        raise InstanceReplyError("the instance returned embeddings of different sizes")
    return np.frombuffer(b"".join(chunks), dtype="<f4").reshape(len(chunks), dim)


def sparse_from_replies(replies: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets, indices and values of serialised EmbedSparseResponses, row by row."""
    offsets = [0]
    indices: list[int] = []
    values: list[float] = []
    for reply in replies:
        message = tei_pb2.EmbedSparseResponse.FromString(reply)
        for item in message.sparse_embeddings:
            indices.append(item.index)
            values.append(item.value)
        offsets.append(len(indices))
    return (
        np.asarray(offsets, dtype=np.int32),
        np.asarray(indices, dtype=np.uint32),
        np.asarray(values, dtype=np.float32),
    )


def _packed_embeddings(reply: bytes) -> bytes:
    """Field 1 (packed repeated float) of an EmbedResponse, as little-endian bytes."""
    runs: list[bytes] = []
    pos, size = 0, len(reply)
    try:
        while pos < size:
            key, pos = read_varint(reply, pos)
            if key == 0x0A:  # field 1, length-delimited: a packed run of floats
                length, pos = read_varint(reply, pos)
                runs.append(reply[pos : pos + length])
                pos += length
            elif key >> 3 == 1:  # unpacked floats: rare, let protobuf decode them
                raise WireError("unpacked")
            else:
                pos = skip_field(reply, pos, key & 7)
    except WireError:
        message = tei_pb2.EmbedResponse.FromString(reply)
        return np.asarray(message.embeddings, dtype="<f4").tobytes()
    return runs[0] if len(runs) == 1 else b"".join(runs)


def _write(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()
