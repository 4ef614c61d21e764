"""Atomic file writes: a temp file beside the target, then ``os.replace``.

Readers see the old file or the whole new one, never a part. The result honours the umask
(the temp file is created with mode 0o666 and the umask applied, as ``open()`` does), and
temp files that a killed writer left behind are removed on the next write of the same
target: their names carry the target, the host and the writer's process id, so a temp file
of a writer that is still running (two writers on one path) is never touched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
from typing import BinaryIO, Iterator, Union

PathLike = Union[str, os.PathLike]
_MARK = ".mixq-"


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _prefix(target: str) -> str:
    return f".{os.path.basename(target)}{_MARK}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def remove_stale_temps(target: str) -> int:
    """Remove temp files of ``target`` whose writer (on this host) no longer runs; return how many."""
    directory = os.path.dirname(os.path.abspath(target))
    prefix, host, removed = _prefix(target), _host(), 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix) or not name.endswith(".tmp"):
            continue
        writer_host, _, rest = name[len(prefix):-len(".tmp")].rpartition("-pid")
        pid = rest.partition("-")[0]
        if writer_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content to; it replaces ``path`` when the block
    ends without an exception, and is removed otherwise."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path)
    tmp = os.path.join(directory, f"{_prefix(path)}{_host()}-pid{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
