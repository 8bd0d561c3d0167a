"""Counts of the stream messages this node sent, and of the queue messages (records, acks) they carried, per kind:
what a hop costs is per gRPC message (~150 µs of CPU at each end in grpc.aio), so records per message is the figure
batching is judged by. The kinds are the streams' messages (each a part of a link frame); ``link_frame`` counts
the gRPC messages that carried them, with the parts per frame as its items. Written with the load report
(``/<cluster>/load/<node>``) and read by ``bench/cluster.py``."""

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


class Counters:
    """What the cluster side counts (per peer where it is about one)."""

    def __init__(self) -> None:
        #: peer -> publishes forwarded to it (records), and routed to it for its consumers (deliveries).
        self.forwarded: collections.Counter[str] = collections.Counter()
        self.routed: collections.Counter[str] = collections.Counter()
        #: peer -> gRPC streams to or from it that ended with an error.
        self.stream_errors: collections.Counter[str] = collections.Counter()
        #: etcd requests that failed.
        self.etcd_errors = 0
        #: Partitions this node came to own or lead (claimed, elected or handed to it).
        self.leader_changes = 0


COUNTERS = Counters()
