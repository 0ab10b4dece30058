"""Reading an instance's log: `<log dir>/<name>.log` and the backups its log pipe rotated
out (`<name>.log.1`, the newest, to `<name>.log.N`), as one sequence of lines, oldest first.

Reads are bounded in memory and mostly in I/O: a slice is found by scanning from the
nearer end of the file that holds it, so the last lines of a large log cost a few reads.
`total_lines` is exact: the lines of each file are counted in chunks once and remembered
per file (by inode), so a later call counts only what was appended since. A line is what
ends with a newline (a last line without one counts too); a reply holds at most
MAX_LINES lines and about MAX_TEXT_BYTES of text, and its `end` says where it stopped.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_LINES = 10_000
MAX_TEXT_BYTES = 4 * 1024 * 1024
# Longer lines are cut here in a reply (the file keeps them whole).
MAX_LINE_BYTES = 64 * 1024
CHUNK = 1024 * 1024
# Per file (device, inode): bytes counted, newlines in them, and their last bytes (to tell
# a file that grew from a new file that reuses the inode).
_counted: dict[tuple[int, int], tuple[int, int, bytes]] = {}
_MAX_COUNTED_FILES = 4096
_MARK = 64


def log_path(log_dir: Path, name: str) -> Path:
    return log_dir / f"{name}.log"


def read(
    log_dir: Path, name: str, start: int | None = None, end: int | None = None
) -> dict[str, Any]:
    """Lines `[start:end]` of the instance's log, with Python slice semantics, as the REST
    API returns them: {"lines", "start", "end", "total_lines"}."""
    with contextlib.ExitStack() as stack:
        parts = _open_parts(log_dir, name, stack)
        total = sum(part.lines for part in parts)
        first, last, _ = slice(start, end).indices(total)
        lines = _read_lines(parts, first, min(last - first, MAX_LINES)) if last > first else []
    return {"lines": lines, "start": first, "end": first + len(lines), "total_lines": total}


def tail(log_dir: Path, name: str, count: int) -> list[str]:
    """The last `count` lines of the instance's log."""
    return list(read(log_dir, name, start=-count)["lines"]) if count > 0 else []


def files(log_dir: Path, name: str) -> list[Path]:
    """The instance's log files that exist, oldest first."""
    base = log_path(log_dir, name)
    prefix = f"{base.name}."
    try:
        backups = [
            (int(entry.name[len(prefix) :]), Path(entry.path))
            for entry in os.scandir(log_dir)
            if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdigit()
        ]
    except FileNotFoundError:
        return []
    ordered = [path for _, path in sorted(backups, reverse=True)]
    return ordered + [base] if base.exists() else ordered


@dataclass
class _Part:
    fd: int
    size: int
    newlines: int
    ends_with_newline: bool

    @property
    def lines(self) -> int:
        return self.newlines + (0 if self.ends_with_newline else 1)


def _open_parts(log_dir: Path, name: str, stack: contextlib.ExitStack) -> list[_Part]:
    """Open every file once (a snapshot: later writes and renames do not move it)."""
    parts, seen = [], set()
    for path in files(log_dir, name):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # rotated away meanwhile
        stack.callback(os.close, fd)
        stat = os.fstat(fd)
        key = (stat.st_dev, stat.st_ino)
        if key not in seen:  # a rotation between listing and opening
            seen.add(key)
            parts.append(_count(fd, stat.st_size, key))
    return parts


def _count(fd: int, size: int, key: tuple[int, int]) -> _Part:
    done, newlines, mark = _counted.get(key, (0, 0, b""))
    if done > size or (mark and os.pread(fd, len(mark), done - len(mark)) != mark):
        done, newlines = 0, 0
    while done < size:
        chunk = os.pread(fd, min(CHUNK, size - done), done)
        if not chunk:
            break  # truncated under us
        newlines += chunk.count(b"\n")
        done += len(chunk)
    mark = os.pread(fd, min(_MARK, done), done - min(_MARK, done)) if done else b""
    if len(_counted) >= _MAX_COUNTED_FILES:
        _counted.clear()
    _counted[key] = (done, newlines, mark)
    return _Part(fd, done, newlines, ends_with_newline=not mark or mark.endswith(b"\n"))


def _read_lines(parts: list[_Part], first: int, count: int) -> list[str]:
    """`count` lines from line `first` on (0-based over all parts)."""
    index = 0
    while first >= parts[index].lines:
        first -= parts[index].lines
        index += 1
    offset = _offset_of_line(parts[index], first)
    lines: list[str] = []
    budget = MAX_TEXT_BYTES
    for part in parts[index:]:
        for raw in _lines_from(part, offset):
            lines.append(raw.decode("utf-8", errors="replace"))
            budget -= len(raw)
            if len(lines) == count or budget <= 0:
                return lines
        offset = 0
    return lines


def _offset_of_line(part: _Part, line: int) -> int:
    """Where line `line` (0-based) of a file begins: after its `line`-th newline, found
    from whichever end of the file is nearer."""
    if line == 0:
        return 0
    if line <= part.newlines - line:
        return _after_newline_from_start(part, line)
    return _after_newline_from_end(part, part.newlines - line + 1)


def _after_newline_from_start(part: _Part, nth: int) -> int:
    position = 0
    while position < part.size:
        chunk = os.pread(part.fd, min(CHUNK, part.size - position), position)
        found = chunk.count(b"\n")
        if found >= nth:
            at = -1
            for _ in range(nth):
                at = chunk.index(b"\n", at + 1)
            return position + at + 1
        nth -= found
        position += len(chunk)
    return part.size


def _after_newline_from_end(part: _Part, nth: int) -> int:
    end = part.size
    while end > 0:
        start = max(0, end - CHUNK)
        chunk = os.pread(part.fd, end - start, start)
        found = chunk.count(b"\n")
        if found >= nth:
            at = len(chunk)
            for _ in range(nth):
                at = chunk.rindex(b"\n", 0, at)
            return start + at + 1
        nth -= found
        end = start
    return 0


def _lines_from(part: _Part, offset: int) -> Any:
    """The lines of a file from `offset` on, without their line ends; each cut to
    MAX_LINE_BYTES."""
    rest, cut = b"", False
    position = offset
    while position < part.size:
        chunk = os.pread(part.fd, min(CHUNK, part.size - position), position)
        if not chunk:
            break
        position += len(chunk)
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            if not cut:
                yield _strip_cr((rest + piece)[:MAX_LINE_BYTES])
            rest, cut = b"", False
        if not cut:
            rest += pieces[-1]
            if len(rest) > MAX_LINE_BYTES:
                yield rest[:MAX_LINE_BYTES]
                rest, cut = b"", True
    if rest:
        yield _strip_cr(rest)


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line
