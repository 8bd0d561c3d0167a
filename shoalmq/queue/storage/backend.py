"""The key-value backends under the partition logs: LMDB on disk, and a dict in memory for unit tests.

A backend is deliberately dumb: named databases of ordered byte keys, atomic batches of puts and deletes, point
reads and ordered range scans. Everything about queues (offsets, segments, acks, group commit) lives above it in
``shoalmq.queue.storage.log``, so both backends run the same queue logic and the same tests.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import lmdb

from shoalmq.errors import StorageError, StorageFull
from shoalmq.queue.storage.keys import DATABASES

log = logging.getLogger(__name__)

#: Free bytes under which an I/O error in a commit is taken for a full disk.
SHORT_OF_SPACE = 1 << 20

Put = tuple[str, bytes, bytes]
Delete = tuple[str, bytes]


class Backend(Protocol):
    """What the partition logs need from storage."""

    def commit(self, puts: Sequence[Put], deletes: Sequence[Delete]) -> None:
        """Apply every put and delete atomically and durably; StorageError (nothing applied) if it can't."""

    def get(self, db: str, key: bytes) -> bytes | None: ...

    def view(self, db: str, key: bytes) -> AbstractContextManager[bytes | memoryview | None]:
        """``with backend.view(db, key) as value``: the value (None if absent), valid only inside the block; LMDB
        gives a view of its map, so reading a part of a large value copies only that part."""

    def scan(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """The (key, value) pairs whose key starts with ``prefix``, in key order (a snapshot)."""

    def close(self) -> None: ...


class MemoryBackend:
    """Dicts standing in for the databases. Commits apply at once; nothing survives the process."""

    def __init__(self) -> None:
        self.dbs: dict[str, dict[bytes, bytes]] = {name: {} for name in DATABASES}
        self.commits = 0

    def commit(self, puts: Sequence[Put], deletes: Sequence[Delete]) -> None:
        for db, key, value in puts:
            self.dbs[db][key] = bytes(value)
        for db, key in deletes:
            self.dbs[db].pop(key, None)
        self.commits += 1

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.dbs[db].get(key)

    def view(self, db: str, key: bytes) -> AbstractContextManager[bytes | None]:
        return nullcontext(self.dbs[db].get(key))

    def scan(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        items = sorted((k, v) for k, v in self.dbs[db].items() if k.startswith(prefix))
        return iter(items)

    def close(self) -> None:
        pass


class LmdbBackend:
    """One LMDB environment per node (``<data-dir>/queues``), with LMDB's own crash-safe commit protocol.

    A commit fsyncs its data pages, then writes and fsyncs its meta page (``sync`` and ``metasync`` on): when
    ``commit`` returns, the transaction is durable, and a crash at any point leaves the previous one intact.
    Commits and reads run in the event loop's thread (see docs/design.md, "Commit protocol", for why not a thread).

    The map (LMDB's address space for the file) starts at ``map_size`` and doubles whenever a commit reports it
    full, up to ``max_map_size`` if set. A commit that fails because the disk is full aborts as a whole.
    """

    def __init__(self, path: str | Path, map_size: int = 1 << 30, max_map_size: int | None = None) -> None:
        self.path = Path(path)
        self.max_map_size = max_map_size
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(
                str(self.path), map_size=map_size, max_dbs=len(DATABASES), subdir=True,
                sync=True, metasync=True, writemap=False, readahead=False, max_spare_txns=2,
            )
        except (OSError, lmdb.Error) as exc:
            raise StorageError(f"cannot open the partition log in {self.path}: {exc}") from None
        self.dbs = {name: self.env.open_db(name.encode()) for name in DATABASES}

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def commit(self, puts: Sequence[Put], deletes: Sequence[Delete]) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for db, key, value in puts:
                        txn.put(key, value, db=self.dbs[db])
                    for db, key in deletes:
                        txn.delete(key, db=self.dbs[db])
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                raise self._error("commit failed", exc) from None

    def _error(self, what: str, exc: lmdb.Error) -> StorageError:
        if _is_disk_full(exc, self.path):
            return StorageFull(f"partition log in {self.path}: disk full ({exc})")
        return StorageError(f"partition log in {self.path}: {what}: {exc}")

    def _grow(self) -> None:
        # Only called between transactions, in the one thread that runs them all: LMDB allows a resize then.
        current = self.map_size
        target = current * 2
        if self.max_map_size is not None:
            if current >= self.max_map_size:
                raise StorageFull(f"partition log in {self.path} reached max_map_size ({self.max_map_size} bytes)")
            target = min(target, self.max_map_size)
        try:
            self.env.set_mapsize(target)
        except lmdb.Error as exc:
            raise self._error(f"cannot grow the map to {target} bytes", exc) from None
        log.info("partition log map grown from %d to %d MiB", current >> 20, target >> 20)

    def get(self, db: str, key: bytes) -> bytes | None:
        with self.env.begin(db=self.dbs[db], buffers=False) as txn:
            return txn.get(key)

    @contextmanager
    def view(self, db: str, key: bytes) -> Iterator[memoryview | None]:
        # A read transaction for the block: the memoryview points into the map and dies with it.
        with self.env.begin(db=self.dbs[db], buffers=True) as txn:
            yield txn.get(key)

    def scan(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        with self.env.begin(db=self.dbs[db]) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix):
                return iter(())
            items = []
            for key, value in cursor:
                if not key.startswith(prefix):
                    break
                items.append((key, value))
        return iter(items)

    def close(self) -> None:
        self.env.close()


def _is_disk_full(exc: lmdb.Error, path: Path) -> bool:
    text = str(exc)
    if "No space left" in text or os.strerror(errno.ENOSPC) in text or "ENOSPC" in text:
        return True
    # A write the disk could take only part of is a "short write", which LMDB reports as EIO.
    if os.strerror(errno.EIO) in text:
        try:
            stat = os.statvfs(path)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < SHORT_OF_SPACE
    return False
