"""Durable partition logs: an LMDB backend (or an in-memory one for tests) under a group-committing store.

- ``keys``: the key and value layout (documented there and in docs/design.md).
- ``backend``: ``LmdbBackend`` and ``MemoryBackend``, behind one small interface.
- ``log``: ``Store`` (group commit, recovery) and ``PartitionLog`` (enqueue, take, ack, nack, depth, limits).
"""

from pathlib import Path

from shoalmq.queue.storage.backend import Backend, LmdbBackend, MemoryBackend
from shoalmq.queue.storage.log import Limits, Message, PartitionLog, Store, SyncMode

LOG_DIR = "queues"


def open_lmdb_store(data_dir: str | Path, *, map_size: int = 1 << 30, max_map_size: int | None = None,
                    **options) -> Store:
    """The node's store on ``<data_dir>/queues`` (must be called inside the running event loop)."""
    return Store(LmdbBackend(Path(data_dir) / LOG_DIR, map_size=map_size, max_map_size=max_map_size), **options)


__all__ = ["Backend", "Limits", "LmdbBackend", "MemoryBackend", "Message", "PartitionLog", "Store", "SyncMode",
           "open_lmdb_store"]
