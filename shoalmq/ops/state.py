"""What one node can say about itself, as plain data: the source of ``/metrics``, the JSON API and ``$SYS``.

Each function reads counters and sizes the node keeps anyway (see ``shoalmq.stats``); nothing here is on a
message's path. On a cluster a node speaks only for what it holds: the partitions it writes (owns, or leads), and
messages stored here for a partition owned elsewhere; a follower's replicas are its leader's to report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from shoalmq import __version__, stats

if TYPE_CHECKING:
    from shoalmq.node import Node
    from shoalmq.queue.manager import Queue
    from shoalmq.queue.storage import PartitionLog


class Rates:
    """Per-queue publish and delivery rates (messages a second), from the counters sampled every ``period``."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self._last: dict[str, tuple[float, int, int]] = {}
        self.rates: dict[str, tuple[float, float]] = {}

    def sample(self, node: Node) -> None:
        now = time.monotonic()
        seen = {}
        for queue in node.queues.queues():
            published = sum(p.published for p in queue.partitions)
            previous = self._last.get(queue.name)
            if previous is not None and now > previous[0]:
                elapsed = now - previous[0]
                self.rates[queue.name] = (max(0, published - previous[1]) / elapsed,
                                          max(0, queue.delivered - previous[2]) / elapsed)
            seen[queue.name] = (now, published, queue.delivered)
        self._last = seen
        for name in list(self.rates):
            if name not in seen:
                del self.rates[name]


def node_id(node: Node) -> str:
    return node.cluster.node_id if node.cluster is not None else "local"


def writes(node: Node, queue: Queue, part: PartitionLog) -> bool:
    """Whether this node writes the partition (owns or leads it; always, alone)."""
    if node.cluster is None:
        return True
    return (queue.name, part.index) in node.cluster.coordinator.view.mine


def reported(node: Node, queue: Queue) -> Iterator[tuple[PartitionLog, bool]]:
    """The queue's partitions this node reports, with whether it writes them: those it writes, and those it stores
    messages of without owning them (not the replicas it follows)."""
    if node.cluster is None:
        for part in queue.partitions:
            yield part, True
        return
    view = node.cluster.coordinator.view
    for part in queue.partitions:
        key = (queue.name, part.index)
        if key in view.mine:
            yield part, True
        elif part.depth and key not in view.records:
            yield part, False


def queue_local(node: Node, queue: Queue, rates: Rates | None = None) -> dict[str, Any]:
    """One queue as this node holds it: settings, counts, its partitions and its consumers connected here."""
    partitions = []
    ready = unacked = depth = 0
    for part, written in reported(node, queue):
        partitions.append({"partition": part.index, "ready": part.ready, "unacked": part.inflight,
                           "depth": part.depth, "writes": written, "next_offset": part.next_offset})
        ready += part.ready
        unacked += part.inflight
        depth += part.depth
    consumers = []
    for state in queue.consumers:
        consumer = state.consumer
        if getattr(consumer, "remote", False):
            continue
        session = getattr(consumer, "session", None)
        consumers.append({"client_id": getattr(session, "client_id", None) or consumer_label(consumer),
                          "address": getattr(session, "peer", None), "node": node_id(node),
                          "unacked": len(state.inflight), "window": consumer.window})
    publish_rate, deliver_rate = rates.rates.get(queue.name, (0.0, 0.0)) if rates is not None else (0.0, 0.0)
    return {
        "name": queue.name,
        "settings": asdict(queue.config),
        "dead_letter_queue": queue.is_dlq,
        "ready": ready,
        "unacked": unacked,
        "depth": depth,
        "consumers": consumers,
        "published": sum(p.published for p in queue.partitions),
        "delivered": queue.delivered,
        "redelivered": queue.redelivered,
        "acked": queue.acked,
        "dead_lettered": queue.dead_lettered,
        "expired": queue.expired,
        "purged": queue.purged,
        "redriven": queue.redriven,
        "refused": refused_of(queue.name),
        "publish_rate": round(publish_rate, 1),
        "deliver_rate": round(deliver_rate, 1),
        "partitions": partitions,
    }


def consumer_label(consumer: Any) -> str:
    return str(getattr(consumer, "name", None) or type(consumer).__name__)


def refused_of(queue: str) -> dict[str, int]:
    return {reason: count for (name, reason), count in stats.FRONT_END.refused.items() if name == queue}


def node_local(node: Node) -> dict[str, Any]:
    """This node: identity, uptime, clients, and what it stores."""
    front = stats.FRONT_END
    broker = node.front_end.broker if node.front_end is not None else None
    engine = broker.engine if broker is not None else None
    store = node.store
    info: dict[str, Any] = {
        "node": node_id(node),
        "version": __version__,
        "mode": "cluster" if node.cluster is not None else "single",
        "uptime_seconds": int(time.time() - node.started),
        "pid": os.getpid(),
        "mqtt": node.front_end.addresses if node.front_end is not None else [],
        "http": node.http_address,
        "data_dir": str(node.config.data_dir),
        "ready": node.ready,
        "clients_connected": broker.connected if broker is not None else 0,
        "sessions": len(engine.sessions) if engine is not None else 0,
        "subscriptions": len(engine.tree) if engine is not None else 0,
        "retained_messages": len(engine.retained) if engine is not None else 0,
        "messages_received": front.publishes_received,
        "messages_sent": front.publishes_sent,
        "bytes_received": front.bytes_received,
        "bytes_sent": front.bytes_sent,
        "queues": len(node.queues.queues()) if node.queues is not None else 0,
        "commits": store.commits if store is not None else 0,
        "memory_ring_bytes": store.pool.cost if store is not None else 0,
    }
    if node.cluster is not None:
        membership = node.cluster.membership
        info.update({"cluster": node.config.cluster, "lease_valid": membership.lease_valid(),
                     "draining": membership.draining, "leads": len(node.cluster.coordinator.view.mine)})
    return info
