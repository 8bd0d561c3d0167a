"""The node's data directory: created on first start and held by one broker at a time.

Two brokers writing one directory would corrupt each other's state, so the first to start takes an exclusive
``flock`` on ``<data-dir>/LOCK`` and keeps it until it exits (the kernel drops it even after ``kill -9``). A clean
stop removes the file while it still holds the lock; so that a broker that opened the file just before cannot then
lock a file no longer in the directory (while a third locks the new one), a broker that got the lock checks that the
file it locked is still the one at the path, and starts over if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from shoalmq.errors import StartupError, os_error_text


class DataDir:
    """An opened, locked data directory."""

    LOCK_NAME = "LOCK"

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    @classmethod
    def open(cls, path: str | Path) -> DataDir:
        """Create the directory if needed and lock it; StartupError if it is unusable or already held."""
        path = Path(path).absolute()
        while True:
            fd = cls._lock(path)
            try:
                if os.fstat(fd).st_ino == os.stat(path / cls.LOCK_NAME).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # (the holder removed it as we locked it: lock the new one)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    @classmethod
    def _lock(cls, path: Path) -> int:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / cls.LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"data directory {path}: {os_error_text(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                by = f" by process {holder}" if holder else ""
                raise StartupError(f"data directory {path} is in use{by}; one broker per data directory") from None
            raise StartupError(f"data directory {path}: cannot lock: {os_error_text(exc)}") from None
        return fd

    def close(self) -> None:
        """Remove the LOCK file and release the lock (after a crash the file stays: the next start takes it)."""
        if self._lock_fd is not None:
            try:
                (self.path / self.LOCK_NAME).unlink()
            except OSError:
                pass  # (a read-only or vanished directory: the lock is released all the same)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DataDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
