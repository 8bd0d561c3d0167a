"""The ``$SYS`` topics: mosquitto's ``$SYS/broker/...`` names for what applies, and ShoalMQ's own.

Every ``sys_interval`` seconds the node publishes, retained and at QoS 0 (never stored: they are the broker's own
and published again each interval), what it counts: clients, messages, bytes, subscriptions, retained messages,
load averages (per minute, over 1, 5 and 15 minutes, as mosquitto computes them), uptime and version; and, per
queue, ``$SYS/shoalmq/queues/<name>/depth``: the messages this node holds of it (on a cluster, each node its own).

``$SYS/shoalmq/topology`` (retained, JSON) is what a partition-aware client needs: the nodes with their MQTT
addresses, and each queue's partition count and the node leading each partition. It is published again as soon as
it changes (a node joins or leaves, a partition moves), not only each interval.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import TYPE_CHECKING, Any

from shoalmq import __version__, stats
from shoalmq.broker.sessions import Message

if TYPE_CHECKING:
    from shoalmq.node import Node

#: (name, seconds) of the load averages.
LOAD_PERIODS = (("1min", 60.0), ("5min", 300.0), ("15min", 900.0))
#: Seconds a change of the topology waits for more changes before it is published.
TOPOLOGY_SETTLE = 0.2


class SysPublisher:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._last: dict[str, int] = {}
        self._loads: dict[str, float] = {}
        self._topology: bytes | None = None
        self._topology_due: asyncio.TimerHandle | None = None
        self._max_connected = 0
        self._queues_published: set[str] = set()

    def publish(self, topic: str, value: Any) -> None:
        front_end = self.node.front_end
        if front_end is None or front_end.broker is None:
            return
        payload = value if isinstance(value, bytes) else str(value).encode()
        front_end.broker.engine.publish(Message(topic, payload, 0, True))

    async def run(self, interval: float) -> None:
        cluster = self.node.cluster
        if cluster is not None:
            cluster.coordinator.view.on_owners.append(self.topology_changed)
            cluster.membership.on_change.append(lambda _nodes: self.topology_changed())
        self.publish_topology()
        while True:
            self.publish_counts(interval)
            await asyncio.sleep(interval)

    def publish_counts(self, interval: float) -> None:
        node = self.node
        front = stats.FRONT_END
        broker = node.front_end.broker if node.front_end is not None else None
        if broker is None:
            return
        engine = broker.engine
        connected = broker.connected
        self._max_connected = max(self._max_connected, connected)
        sessions = engine.sessions.values()
        counts = {
            "messages/received": front.publishes_received, "messages/sent": front.publishes_sent,
            "publish/messages/received": front.publishes_received, "publish/messages/sent": front.publishes_sent,
            "bytes/received": front.bytes_received, "bytes/sent": front.bytes_sent,
            "connections": front.connections,
        }
        values: dict[str, Any] = {
            "version": f"ShoalMQ version {__version__}",
            "uptime": f"{int(time.time() - node.started)} seconds",
            "clients/connected": connected,
            "clients/active": connected,
            "clients/total": len(engine.sessions),
            "clients/disconnected": sum(1 for s in sessions if s.connection is None),
            "clients/maximum": self._max_connected,
            "subscriptions/count": len(engine.tree),
            "retained messages/count": len(engine.retained),
            "messages/received": front.publishes_received,
            "messages/sent": front.publishes_sent,
            "publish/messages/received": front.publishes_received,
            "publish/messages/sent": front.publishes_sent,
            "publish/messages/dropped": engine.dropped,
            "bytes/received": front.bytes_received,
            "bytes/sent": front.bytes_sent,
            "store/messages/count": sum(q.depth for q in node.queues.queues()) if node.queues else 0,
        }
        for key, total in counts.items():
            previous = self._last.get(key)
            self._last[key] = total
            if previous is None:
                continue
            per_minute = max(0, total - previous) * 60.0 / interval
            for name, period in LOAD_PERIODS:
                load_key = f"load/{key.replace('publish/messages', 'publish')}/{name}"
                if key == "connections":
                    load_key = f"load/connections/{name}"
                decay = math.exp(-interval / period)
                old = self._loads.get(load_key, 0.0)
                self._loads[load_key] = old * decay + per_minute * (1 - decay)
        for key, load in self._loads.items():
            values[key] = f"{load:.2f}"
        for key, value in values.items():
            self.publish(f"$SYS/broker/{key}", value)
        if node.queues is not None:
            names = set()
            for queue in node.queues.queues():
                names.add(queue.name)
                self.publish(f"$SYS/shoalmq/queues/{queue.name}/depth", queue.depth)
            for gone in self._queues_published - names:  # a deleted queue: its retained depth goes too
                self.publish(f"$SYS/shoalmq/queues/{gone}/depth", b"")
            self._queues_published = names
        self.publish_topology()

    def topology_changed(self) -> None:
        if self._topology_due is None:
            self._topology_due = asyncio.get_running_loop().call_later(TOPOLOGY_SETTLE, self.publish_topology)

    def topology(self) -> dict[str, Any]:
        node = self.node
        cluster = node.cluster
        if cluster is None:
            front_end = node.front_end
            queues = node.queues.queues() if node.queues is not None else []
            return {"cluster": None, "nodes": {"local": {"mqtt": front_end.addresses if front_end else []}},
                    "queues": {q.name: {"partitions": len(q.partitions), "leaders": ["local"] * len(q.partitions)}
                               for q in sorted(queues, key=lambda q: q.name)}}
        view = cluster.coordinator.view
        return {
            "cluster": node.config.cluster,
            "nodes": {n: {"mqtt": info.get("mqtt"), "draining": bool(info.get("draining"))}
                      for n, info in sorted(view.nodes.items())},
            "queues": {name: {"partitions": config.partitions,
                              "leaders": [(o.node if (o := view.owners.get((name, p))) else None)
                                          for p in range(config.partitions)]}
                       for name, config in sorted(view.definitions.items())},
        }

    def publish_topology(self) -> None:
        self._topology_due = None
        payload = json.dumps(self.topology(), sort_keys=True, separators=(",", ":")).encode()
        if payload != self._topology:
            self._topology = payload
            self.publish("$SYS/shoalmq/topology", payload)
