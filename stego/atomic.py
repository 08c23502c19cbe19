"""Crash-safe file writing: nothing half-written is ever taken for a finished file.

Every file stego writes that a later run may read (crops, caches, neighbour tables, checkpoints,
models) goes through :func:`atomic_write`: the bytes land in a temporary file in the same
directory, are flushed to disk, and only then renamed over the final name. A process killed
mid-write leaves at most a ``*.tmp-*`` file that no reader ever opens.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from stego.errors import StegoError

__all__ = ["atomic_write", "file_lock", "check_free_space", "format_bytes"]


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` only when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and is_no_space(exc):
            raise StegoError(
                f"disk full while writing {path}; nothing was left half-written. Free some "
                "space (or choose another output folder) and run the command again"
            ) from exc
        raise


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block.

    Two stego processes that build the same cache or table serialise on this lock instead of
    interleaving their writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def format_bytes(n: float) -> str:
    """Human-readable size, e.g. ``1.5 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def check_free_space(
    path: str | Path, nbytes: int, what: str, margin: float = 1.05, fix: str | None = None
) -> None:
    """Raise :class:`StegoError` when the file system of ``path`` cannot hold ``nbytes`` more;
    ``fix``: what to do instead (default: free some space or write elsewhere)."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes * margin > free:
        raise StegoError(
            f"not enough disk space for {what} in {path}: needs about {format_bytes(nbytes)}, "
            f"{format_bytes(free)} free. "
            + (fix or "Free some space or choose another output directory")
            + "."
        )


def is_no_space(exc: OSError) -> bool:
    """True when ``exc`` means the disk is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
