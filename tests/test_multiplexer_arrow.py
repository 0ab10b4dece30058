"""The Arrow codec without a socket: what is accepted, what is refused, what is produced."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
from tei.v1 import tei_pb2

from multiplexer import arrow


def ipc(table: pa.Table, compression: str | None = "lz4") -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string()])
@pytest.mark.parametrize("compression", [None, "lz4"])
def test_it_reads_the_text_column(kind: pa.DataType, compression: str | None) -> None:
    table = pa.table({"id": [1, 2, 3], "text": pa.array(["a", "b", "ç"], kind)})
    assert arrow.read_texts(ipc(table, compression)) == ["a", "b", "ç"]


def test_it_reads_every_batch_of_the_stream_in_order() -> None:
    schema = pa.schema([("text", pa.string())])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(["1", "2"])], schema=schema))
        writer.write_batch(pa.record_batch([pa.array(["3"])], schema=schema))
    assert arrow.read_texts(sink.getvalue().to_pybytes()) == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "not a readable Arrow IPC stream"),
        (b"\x00garbage\xff" * 10, "not a readable Arrow IPC stream"),
        (ipc(pa.table({"body": ["x"]})), "no 'text' column (columns: body)"),
        (ipc(pa.table({"text": [1, 2]})), "must be utf8 or large_utf8, not int64"),
        (ipc(pa.table({"text": pa.array([], pa.string())})), "no rows"),
        (ipc(pa.table({"text": ["a", None]})), "1 null value"),
    ],
)
def test_it_refuses_unusable_input_with_a_message(payload: bytes, message: str) -> None:
    with pytest.raises(arrow.ArrowInputError, match=re.escape(message)):
        arrow.read_texts(payload)


def test_it_writes_dense_embeddings_as_a_fixed_size_list_compressed() -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    payload = arrow.dense_ipc(vectors)
    table = read(payload)
    assert table.schema.field("embeddings").type == pa.list_(pa.float32(), 4)
    assert np.array_equal(np.array(table.column("embeddings").to_pylist()), vectors)


def test_it_writes_sparse_embeddings_as_a_list_of_structs() -> None:
    offsets = np.array([0, 2, 2, 3], np.int32)
    payload = arrow.sparse_ipc(
        offsets, np.array([5, 9, 1], np.uint32), np.array([0.5, 1.5, 2.0], np.float32)
    )
    table = read(payload)
    item = pa.struct([("index", pa.uint32()), ("value", pa.float32())])
    assert table.schema.field("sparse_embeddings").type == pa.list_(item)
    assert table.column("sparse_embeddings").to_pylist() == [
        [{"index": 5, "value": 0.5}, {"index": 9, "value": 1.5}],
        [],
        [{"index": 1, "value": 2.0}],
    ]


def test_it_compresses_its_replies_with_lz4_frame() -> None:
    vectors = np.zeros((64, 384), np.float32)
    assert len(arrow.dense_ipc(vectors)) < vectors.nbytes / 10


def test_it_stacks_embed_replies_without_losing_precision() -> None:
    rows = [np.random.default_rng(i).random(8).astype(np.float32) for i in range(3)]
    replies = [
        tei_pb2.EmbedResponse(
            embeddings=row.tolist(), metadata=tei_pb2.Metadata(compute_tokens=3)
        ).SerializeToString()
        for row in rows
    ]
    assert np.array_equal(arrow.dense_from_replies(replies), np.stack(rows))


def test_it_refuses_replies_of_different_sizes() -> None:
    replies = [
        tei_pb2.EmbedResponse(embeddings=[1.0, 2.0]).SerializeToString(),
        tei_pb2.EmbedResponse(embeddings=[1.0]).SerializeToString(),
    ]
    with pytest.raises(arrow.InstanceReplyError):
        arrow.dense_from_replies(replies)


def test_it_flattens_sparse_replies_row_by_row() -> None:
    replies = [
        tei_pb2.EmbedSparseResponse(
            sparse_embeddings=[tei_pb2.SparseValue(index=i, value=v) for i, v in row]
        ).SerializeToString()
        for row in ([(3, 0.25), (7, 1.0)], [], [(2, 0.5)])
    ]
    offsets, indices, values = arrow.sparse_from_replies(replies)
    assert offsets.tolist() == [0, 2, 2, 3]
    assert indices.tolist() == [3, 7, 2]
    assert values.tolist() == [0.25, 1.0, 0.5]


def test_it_answers_noop_with_one_dummy_row_per_input() -> None:
    assert read(arrow.noop_dense(5)).num_rows == 5
    assert read(arrow.noop_sparse(2)).num_rows == 2
