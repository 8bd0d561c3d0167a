"""Counts of the gRPC stream messages this node sent, and of the queue messages (records, acks) they carried, per
kind: what a hop costs is per stream message (~100 µs at each end in grpc.aio), so records per stream message is
the figure batching is judged by. Written with the load report (``/<cluster>/load/<node>``) and read by
``bench/cluster.py``."""

from __future__ import annotations

import collections

#: kind -> stream messages sent by this node.
MESSAGES: collections.Counter[str] = collections.Counter()
#: kind -> queue messages (records delivered or copied, acks) those carried.
ITEMS: collections.Counter[str] = collections.Counter()


def sent(kind: str, items: int) -> None:
    MESSAGES[kind] += 1
    ITEMS[kind] += items


def snapshot() -> dict[str, list[int]]:
    """kind -> [stream messages, queue messages carried]."""
    return {kind: [count, ITEMS[kind]] for kind, count in sorted(MESSAGES.items())}
