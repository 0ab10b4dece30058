"""A tiny protobuf wire scan: split a multiplexer wrapper into its Target and inner request.

Every `tei_multiplexer.v1` wrapper is `{Target target = 1; tei.v1.X request = 2;}`. The
multiplexer never decodes the inner request: it forwards its bytes as they came, which
saves a parse and a re-serialisation per call (and keeps unknown fields intact).
"""

from __future__ import annotations

from dataclasses import dataclass


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a call goes: exactly one of the three is set, or none (no target)."""

    instance_name: str | None = None
    model_id: str | None = None
    instance_index: int | None = None

    @property
    def is_set(self) -> bool:
        return (
            self.instance_name is not None
            or self.model_id is not None
            or self.instance_index is not None
        )

    def describe(self) -> str:
        if self.instance_name is not None:
            return f"instance '{self.instance_name}'"
        if self.model_id is not None:
            return f"model '{self.model_id}'"
        if self.instance_index is not None:
            return f"instance index {self.instance_index}"
        return "no target"


NO_TARGET = Target()


def split_wrapper(data: bytes) -> tuple[Target, bytes]:
    """Return the Target (field 1) and the inner request bytes (field 2) of a wrapper.

    Repeated occurrences merge as protobuf says: embedded messages concatenate.
    """
    target_parts: list[bytes] = []
    inner_parts: list[bytes] = []
    pos, size = 0, len(data)
    while pos < size:
        key, pos = read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == 2:
            length, pos = read_varint(data, pos)
            end = pos + length
            if end > size:
                raise WireError("truncated length-delimited field")
            if field == 1:
                target_parts.append(data[pos:end])
            elif field == 2:
                inner_parts.append(data[pos:end])
            pos = end
        else:
            pos = skip_field(data, pos, wire_type)
    target = parse_target(b"".join(target_parts)) if target_parts else NO_TARGET
    inner = inner_parts[0] if len(inner_parts) == 1 else b"".join(inner_parts)
    return target, inner


def parse_target(data: bytes) -> Target:
    """Decode a `Target` message; the last member of the oneof on the wire wins."""
    target = NO_TARGET
    pos, size = 0, len(data)
    while pos < size:
        key, pos = read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field in (1, 2) and wire_type == 2:
            length, pos = read_varint(data, pos)
            end = pos + length
            if end > size:
                raise WireError("truncated target")
            try:
                text = data[pos:end].decode("utf-8")
            except UnicodeDecodeError:
                raise WireError("target is not valid UTF-8") from None
            target = Target(instance_name=text) if field == 1 else Target(model_id=text)
            pos = end
        elif field == 3 and wire_type == 0:
            value, pos = read_varint(data, pos)
            target = Target(instance_index=value & 0xFFFFFFFF)
        elif field == 0:
            raise WireError("field number 0")
        else:
            pos = skip_field(data, pos, wire_type)
    return target


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    size = len(data)
    while True:
        if pos >= size or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def skip_field(data: bytes, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return read_varint(data, pos)[1]
    if wire_type == 1:
        end = pos + 8
    elif wire_type == 5:
        end = pos + 4
    elif wire_type == 2:
        length, pos = read_varint(data, pos)
        end = pos + length
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if end > len(data):
        raise WireError("truncated field")
    return end
