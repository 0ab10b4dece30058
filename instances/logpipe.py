"""An instance's log pipe, the process the worker spawns for each instance:

    python -m instances.logpipe [--max-bytes N] [--backups K] [--status-fd FD] LOG -- COMMAND...

It starts COMMAND as its child, in a process group of its own, with stdout and stderr
into a pipe, and appends what comes out of the pipe to LOG a line at a time, rotating LOG
by size the way logging.handlers.RotatingFileHandler does (LOG.1 is the newest backup,
LOG.K the oldest; 0 for either turns rotation off). It runs as long as its instance: it
ignores SIGTERM, SIGINT and SIGHUP (a stop signals the instance's group, and the last
lines must still reach the file), and exits once the instance is gone and the pipe is
drained. The instance outlives a dying worker, and so does this.

The instance's own API key (API_KEY, in the environment both share) never reaches LOG:
text-embeddings-router prints its arguments at start, the key among them, and the log is
served by the API and the admin. Each occurrence is written as `[redacted]`.

On FD it writes `pid<TAB><pid>` of the instance, and `error<TAB><errno><TAB><file><TAB>
<message>` when COMMAND (or LOG) cannot be used; FD closes when COMMAND runs.
Standard library only: it must start fast and never import Django.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

READ_SIZE = 64 * 1024
# A line without its end for this long, or this big, is written as it is.
PARTIAL_LINE_SECS = 1.0
MAX_PARTIAL_LINE = 64 * 1024
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
REDACTED = b"[redacted]"


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    try:
        # The instance's environment, set by instances/launch.py: its key, to keep it out.
        secret = os.environ.get("API_KEY", "").encode()
        log = RotatingLog(args.log, args.max_bytes, args.backups, secret)
    except OSError as exc:
        _report(args.status_fd, f"error\t{exc.errno or 0}\t{args.log}\t{exc.strerror or exc}")
        return 1
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    log.write(f"--- {_stamp()} tei-manager: starting {' '.join(args.command)}\n".encode())
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        _exec(args.command, read_end, write_end, log, args.status_fd)
    os.close(write_end)
    with contextlib.suppress(OSError):
        os.setpgid(child, child)  # also done by the child: whichever runs first
    _report(args.status_fd, f"pid\t{child}")
    if args.status_fd is not None:
        os.close(args.status_fd)
    status = pump(read_end, log, child)
    log.write(f"--- {_stamp()} tei-manager: {_describe(status)}\n".encode())
    return 0


@dataclass(frozen=True)
class Args:
    log: str
    command: list[str]
    max_bytes: int = 0
    backups: int = 0
    status_fd: int | None = None


def parse(argv: Sequence[str]) -> Args:
    """`[--max-bytes N] [--backups K] [--status-fd FD] LOG -- COMMAND...`"""
    args = list(argv)
    if "--" not in args:
        _usage()
    split = args.index("--")
    head, command = args[:split], args[split + 1 :]
    numbers: dict[str, int] = {}
    while len(head) > 1 and head[0] in ("--max-bytes", "--backups", "--status-fd"):
        if not head[1].isdigit():
            _usage()
        numbers[head[0][2:].replace("-", "_")] = int(head[1])
        head = head[2:]
    if len(head) != 1 or not command:
        _usage()
    return Args(log=head[0], command=command, **numbers)


class RotatingLog:
    """Appends whole lines to `path`; past `max_bytes`, shifts path -> path.1 -> ... ->
    path.`backups` (the oldest is dropped) and starts a new file."""

    def __init__(self, path: str, max_bytes: int, backups: int, secret: bytes = b"") -> None:
        self.path = path
        self.secret = secret
        self.max_bytes = max_bytes if backups > 0 else 0
        self.backups = backups
        self._open()

    def write(self, data: bytes) -> None:
        """Write `data` (whole lines, except perhaps at the very end), rotating before a
        line that would take the file past max_bytes. A line is never split across files."""
        if self.secret and self.secret in data:
            data = data.replace(self.secret, REDACTED)
        while data:
            room = self.max_bytes - self.size
            if not self.max_bytes or len(data) <= room:
                self._append(data)
                return
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut:
                self._append(data[:cut])
                data = data[cut:]
            elif self.size == 0:  # one line longer than a whole file: it gets a file alone
                cut = data.find(b"\n") + 1 or len(data)
                self._append(data[:cut])
                data = data[cut:]
            if data:
                self.rotate()

    def rotate(self) -> None:
        os.close(self.fd)
        for index in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self.fd).st_size

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # a full or failing disk: nothing better to do than go on
            view = view[written:]
            self.size += written


def pump(read_end: int, log: RotatingLog, child: int) -> int:
    """Copy the pipe into the log until the instance is gone; returns its wait status."""
    pending = b""
    status: int | None = None
    while True:
        ready, _, _ = select.select([read_end], [], [], PARTIAL_LINE_SECS)
        if ready:
            data = _read(read_end)
            if not data:
                break
            pending += data
            cut = pending.rfind(b"\n") + 1
            if len(pending) - cut > MAX_PARTIAL_LINE:
                cut = len(pending)
            log.write(pending[:cut])
            pending = pending[cut:]
            continue
        if pending:  # a line without its end, quiet for a while: show it
            log.write(pending)
            pending = b""
        status = _reap(child, os.WNOHANG)
        if status is not None:
            # The instance is gone, but something it started holds the pipe open: take
            # what is there and stop, rather than live on without an instance.
            os.set_blocking(read_end, False)
            while data := _read(read_end):
                pending += data
            break
    log.write(pending)
    return status if status is not None else (_reap(child, 0) or 0)


def _exec(
    command: list[str], read_end: int, write_end: int, log: RotatingLog, status_fd: int | None
) -> None:
    """In the child: become the instance (never returns)."""
    try:
        os.setpgid(0, 0)
        for sig in (*STOP_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        for fd in (read_end, write_end, log.fd):
            if fd > 2:
                os.close(fd)
        if status_fd is not None:
            os.set_inheritable(status_fd, False)  # closes when the command runs
        os.execvp(command[0], command)
    except OSError as exc:
        _report(status_fd, f"error\t{exc.errno or 0}\t{command[0]}\t{exc.strerror or exc}")
        with contextlib.suppress(OSError):
            os.write(2, f"cannot run {command[0]}: {exc}\n".encode())
    finally:
        os._exit(127)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, READ_SIZE)
    except BlockingIOError:
        return b""
    except InterruptedError:
        return _read(fd)


def _reap(child: int, flags: int) -> int | None:
    try:
        pid, status = os.waitpid(child, flags)
    except ChildProcessError:
        return None
    return status if pid else None


def _report(status_fd: int | None, line: str) -> None:
    if status_fd is not None:
        with contextlib.suppress(OSError):
            os.write(status_fd, f"{line}\n".encode())


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"instance killed by signal {os.WTERMSIG(status)}"
    return f"instance exited with code {os.waitstatus_to_exitcode(status)}"


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _usage() -> NoReturn:
    sys.stderr.write(__doc__ or "")
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
