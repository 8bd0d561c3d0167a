"""A replicated partition's record in etcd (``/<cluster>/partitions/<queue>/<p>``): see ``replication``."""

from __future__ import annotations

import json
from dataclasses import dataclass

from shoalmq.queue.config import QueueConfig


@dataclass(frozen=True)
class Record:
    """A replicated partition's record in etcd."""

    leader: str
    epoch: int
    replicas: tuple[str, ...]
    isr: tuple[str, ...]
    #: The etcd mod revision it was read at (what a compare-and-swap compares).
    revision: int = 0

    def value(self) -> bytes:
        return json.dumps({"leader": self.leader, "epoch": self.epoch, "replicas": list(self.replicas),
                           "isr": list(self.isr)}).encode()

    def min_insync(self, config: QueueConfig) -> int:
        """The queue's ``min_insync``, capped at the replicas this partition has."""
        return max(1, min(config.min_insync_replicas, len(self.replicas)))


def parse_record(value: bytes, revision: int) -> Record | None:
    """A record from its JSON, or None if it is not a replicated partition's (an owner key of an R=1 queue)."""
    try:
        data = json.loads(value)
        if "leader" not in data:
            return None
        return Record(str(data["leader"]), int(data["epoch"]), tuple(map(str, data["replicas"])),
                      tuple(map(str, data["isr"])), revision)
    except (ValueError, KeyError, TypeError):
        return None
