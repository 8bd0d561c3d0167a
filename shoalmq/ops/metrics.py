"""``/metrics``: the node's counters in Prometheus' text format, read when scraped (prometheus-client's custom
collector), so the message path pays nothing but the integer adds of ``shoalmq.stats`` and the queue's counts.

Names follow Prometheus' conventions: ``shoalmq_`` prefix, ``_total`` counters, base units. A node reports what it
holds (``shoalmq.ops.state.reported``): summing a series over the nodes of a cluster gives the cluster's figure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from shoalmq import __version__, stats
from shoalmq.cluster import stats as cluster_stats
from shoalmq.ops.state import reported

if TYPE_CHECKING:
    from shoalmq.node import Node
    from shoalmq.stats import Histogram

QUEUE_LABELS = ["queue"]
PARTITION_LABELS = ["queue", "partition"]


def registry_for(node: Node) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    registry.register(ProcessCollector(registry=None))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=histogram.buckets(), sum_value=histogram.sum)


class NodeCollector:
    """Reads the node when scraped."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        info = GaugeMetricFamily("shoalmq_build_info", "ShoalMQ's version (always 1)", labels=["version", "node"])
        info.add_metric([__version__, node.cluster.node_id if node.cluster is not None else "local"], 1)
        yield info
        yield GaugeMetricFamily("shoalmq_start_time_seconds", "When the node started (unix time)", value=node.started)
        yield GaugeMetricFamily("shoalmq_ready", "1 while the node serves (what /readyz says)",
                                value=1 if node.ready else 0)
        if node.queues is not None:
            yield from self._queues()
        if node.store is not None:
            yield from self._store()
        yield from self._front_end()
        if node.cluster is not None:
            yield from self._cluster()

    def _queues(self) -> Iterator[Metric]:
        node = self.node
        gauges = {n: GaugeMetricFamily(f"shoalmq_queue_messages_{n}", doc, labels=QUEUE_LABELS) for n, doc in (
            ("ready", "Messages waiting for a consumer"),
            ("unacked", "Messages delivered and not acknowledged yet"))}
        consumers = GaugeMetricFamily("shoalmq_queue_consumers", "Consumers of the queue connected to this node",
                                      labels=QUEUE_LABELS)
        counters = {n: CounterMetricFamily(f"shoalmq_queue_messages_{n}", doc, labels=QUEUE_LABELS) for n, doc in (
            ("published", "Messages stored by a publish (forwarded ones by the node that stored them)"),
            ("delivered", "Messages given to consumers, redeliveries included"),
            ("redelivered", "Messages given to a consumer again (after a consumer left, or an ack timeout)"),
            ("acked", "Messages acknowledged by consumers (and at-most-once deliveries)"),
            ("dead_lettered", "Messages moved to the dead-letter queue after max_deliveries attempts"),
            ("expired", "Messages dropped because their ttl passed before delivery"),
            ("purged", "Messages removed by a purge"),
            ("redriven", "Messages moved from this dead-letter queue back to its queue"))}
        refused = CounterMetricFamily("shoalmq_queue_messages_refused",
                                      "Publishes refused (not stored, not acknowledged), by reason",
                                      labels=["queue", "reason"])
        part_gauges = {n: GaugeMetricFamily(f"shoalmq_partition_messages_{n}", doc, labels=PARTITION_LABELS)
                       for n, doc in (("ready", "Messages of the partition waiting for a consumer"),
                                      ("unacked", "Messages of the partition delivered and not acknowledged"))}
        leader = GaugeMetricFamily("shoalmq_partition_leader",
                                   "1 where this node writes the partition (owns or leads it), 0 where it only "
                                   "stores messages on their way to the owner", labels=PARTITION_LABELS)
        for queue in node.queues.queues():  # type: ignore[union-attr]
            name = queue.name
            ready = unacked = 0
            for part, writes in reported(node, queue):
                labels = [name, str(part.index)]
                part_ready, part_unacked = part.ready, part.inflight
                part_gauges["ready"].add_metric(labels, part_ready)
                part_gauges["unacked"].add_metric(labels, part_unacked)
                leader.add_metric(labels, 1 if writes else 0)
                ready += part_ready
                unacked += part_unacked
            gauges["ready"].add_metric([name], ready)
            gauges["unacked"].add_metric([name], unacked)
            consumers.add_metric([name], sum(1 for s in queue.consumers if not getattr(s.consumer, "remote", False)))
            values = {"published": sum(p.published for p in queue.partitions), "delivered": queue.delivered,
                      "redelivered": queue.redelivered, "acked": queue.acked, "dead_lettered": queue.dead_lettered,
                      "expired": queue.expired, "purged": queue.purged, "redriven": queue.redriven}
            for key, value in values.items():
                counters[key].add_metric([name], value)
        for (name, reason), count in sorted(stats.FRONT_END.refused.items()):
            if name:
                refused.add_metric([name, reason], count)
        yield from gauges.values()
        yield consumers
        yield from counters.values()
        yield refused
        yield from part_gauges.values()
        yield leader

    def _store(self) -> Iterator[Metric]:
        store = self.node.store
        assert store is not None
        yield CounterMetricFamily("shoalmq_commits", "Group commits written to the partition log",
                                  value=store.commits)
        yield CounterMetricFamily("shoalmq_commit_failures", "Group commits that failed (a full disk, say)",
                                  value=store.commit_failures)
        yield _histogram("shoalmq_commit_duration_seconds", "Seconds a commit's write (and sync) took",
                         store.commit_seconds)
        yield _histogram("shoalmq_commit_messages", "Messages a commit wrote", store.commit_messages)
        yield GaugeMetricFamily("shoalmq_memory_ring_bytes", "Bytes of ready messages held in memory, all partitions",
                                value=store.pool.cost)
        yield GaugeMetricFamily("shoalmq_memory_budget_bytes", "The memory_budget those bytes are kept within",
                                value=store.memory_budget)

    def _front_end(self) -> Iterator[Metric]:
        front = stats.FRONT_END
        front_end = self.node.front_end
        broker = front_end.broker if front_end is not None else None
        engine = broker.engine if broker is not None else None
        yield GaugeMetricFamily("shoalmq_connections", "MQTT clients connected",
                                value=broker.connected if broker is not None else 0)
        yield CounterMetricFamily("shoalmq_connections_accepted", "MQTT connections accepted",
                                  value=front.connections)
        refused = CounterMetricFamily("shoalmq_connects_refused", "CONNECTs refused, by reason", labels=["reason"])
        for reason in ("bad_credentials", "not_authorized"):
            refused.add_metric([reason], front.connects_refused[reason])
        yield refused
        if engine is not None:
            sessions = list(engine.sessions.values())
            yield GaugeMetricFamily("shoalmq_sessions", "Sessions (connected, and persistent ones kept while away)",
                                    value=len(sessions))
            yield GaugeMetricFamily("shoalmq_sessions_persistent", "Persistent sessions (clean session off)",
                                    value=sum(1 for s in sessions if s.persistent))
            yield GaugeMetricFamily("shoalmq_subscriptions", "Subscriptions to ordinary topics", value=len(engine.tree))
            yield GaugeMetricFamily("shoalmq_retained_messages", "Retained messages", value=len(engine.retained))
            yield CounterMetricFamily("shoalmq_messages_dropped", "Messages of ordinary topics dropped for a "
                                      "session (its queue full, or its connection congested)", value=engine.dropped)
        yield CounterMetricFamily("shoalmq_messages_received", "PUBLISH packets received from clients",
                                  value=front.publishes_received)
        yield CounterMetricFamily("shoalmq_messages_sent", "PUBLISH packets sent to clients",
                                  value=front.publishes_sent)
        yield CounterMetricFamily("shoalmq_received_bytes", "Bytes received from MQTT clients",
                                  value=front.bytes_received)
        yield CounterMetricFamily("shoalmq_sent_bytes", "Bytes sent to MQTT clients", value=front.bytes_sent)

    def _cluster(self) -> Iterator[Metric]:
        cluster = self.node.cluster
        assert cluster is not None
        membership, coordinator = cluster.membership, cluster.coordinator
        counters = cluster_stats.COUNTERS
        yield GaugeMetricFamily("shoalmq_cluster_nodes", "Live nodes this node sees", value=len(membership.nodes))
        yield GaugeMetricFamily("shoalmq_lease_valid", "1 while this node's etcd lease is certainly alive",
                                value=1 if membership.lease_valid() else 0)
        yield GaugeMetricFamily("shoalmq_lease_valid_seconds", "Seconds this node may still trust its lease",
                                value=max(0.0, membership.valid_until - time.monotonic()))
        yield GaugeMetricFamily("shoalmq_node_draining", "1 while this node is drained of its partitions",
                                value=1 if membership.draining else 0)
        yield GaugeMetricFamily("shoalmq_partitions_led", "Partitions this node owns or leads",
                                value=len(coordinator.view.mine))
        yield CounterMetricFamily("shoalmq_partition_leader_changes", "Partitions this node came to own or lead",
                                  value=counters.leader_changes)
        for name, doc, by_peer in (
                ("shoalmq_forwarded_messages", "Publishes forwarded to the partition's owner, by peer",
                 counters.forwarded),
                ("shoalmq_routed_messages", "Messages routed to another node's consumers, by peer", counters.routed),
                ("shoalmq_grpc_stream_errors", "gRPC links to a peer that ended with an error", counters.stream_errors)):
            family = CounterMetricFamily(name, doc, labels=["peer"])
            for peer, count in sorted(by_peer.items()):
                family.add_metric([peer], count)
            yield family
        stream = CounterMetricFamily("shoalmq_grpc_stream_messages", "gRPC stream messages sent, by kind",
                                     labels=["kind"])
        for kind, (count, _) in cluster_stats.snapshot().items():
            stream.add_metric([kind], count)
        yield stream
        yield CounterMetricFamily("shoalmq_etcd_request_errors", "etcd requests that failed", value=cluster.etcd.errors)
        watches = [*coordinator.view._watches, membership._watch]
        yield CounterMetricFamily("shoalmq_etcd_watch_reconnects", "etcd watches that had to start again",
                                  value=sum(w.reconnects + w.relists for w in watches if w is not None))
        yield from self._replication(coordinator)

    def _replication(self, coordinator: Any) -> Iterator[Metric]:
        leaders = coordinator.replicator.leaders
        replicas = GaugeMetricFamily("shoalmq_partition_replicas", "Replicas of a partition this node leads",
                                     labels=PARTITION_LABELS)
        in_sync = GaugeMetricFamily("shoalmq_partition_in_sync_replicas",
                                    "Replicas in the in-sync set of a partition this node leads",
                                    labels=PARTITION_LABELS)
        lag = GaugeMetricFamily("shoalmq_partition_replication_lag_messages",
                                "Messages the furthest-behind replica lacks of a partition this node leads",
                                labels=PARTITION_LABELS)
        lag_seconds = GaugeMetricFamily("shoalmq_partition_replication_lag_seconds",
                                        "Seconds since the furthest-behind replica last had everything",
                                        labels=PARTITION_LABELS)
        for (queue, index), leader in sorted(leaders.items()):
            labels = [queue, str(index)]
            record = leader.record
            replicas.add_metric(labels, len(record.replicas))
            in_sync.add_metric(labels, len(record.isr))
            behind, since = leader.lag(coordinator.replicator.clock())
            lag.add_metric(labels, behind)
            lag_seconds.add_metric(labels, since)
        yield replicas
        yield in_sync
        yield lag
        yield lag_seconds
