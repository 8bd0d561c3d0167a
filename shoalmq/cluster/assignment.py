"""Which node owns which partition.

An assigner is a pure function of the live nodes, so every node computes the same answer from the same view;
the owner then records its ownership in etcd (``/<cluster>/partitions/<queue>/<p>``), which is what other nodes
and ``etcdctl`` read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shoalmq._native import fnv1a_32


class PartitionAssigner(Protocol):
    """Decides the owner of a queue's partitions among the live nodes."""

    def owner(self, queue: str, partition: int, nodes: Sequence[str]) -> str:
        """The node that owns ``partition`` of ``queue`` when ``nodes`` are live (ValueError if none is)."""

    def assign(self, queue: str, partitions: int, nodes: Sequence[str]) -> list[str]:
        """The owner of each of the queue's partitions."""


class HashPartitionAssigner:
    """Partition p of queue q belongs to the live nodes sorted by id, at index ``(p + fnv1a(q)) mod N``.

    The queue's hash offsets the start, so the partition 0 of every queue does not land on the same node.
    Adding or removing a node moves most partitions (a minimal-movement assigner can implement the same interface).
    """

    def owner(self, queue: str, partition: int, nodes: Sequence[str]) -> str:
        if not nodes:
            raise ValueError("no live node to own a partition")
        ordered = sorted(nodes)
        return ordered[(partition + fnv1a_32(queue.encode())) % len(ordered)]

    def assign(self, queue: str, partitions: int, nodes: Sequence[str]) -> list[str]:
        if not nodes:
            raise ValueError("no live node to own a partition")
        ordered = sorted(nodes)
        offset = fnv1a_32(queue.encode())
        return [ordered[(p + offset) % len(ordered)] for p in range(partitions)]
