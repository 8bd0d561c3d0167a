"""Cluster membership through etcd: each node's key on its own lease, and a live view of every node's.

A node registers ``/<cluster>/nodes/<node-id>`` (JSON: its addresses, version, start time) on a lease of ``ttl``
seconds, refreshed every ``ttl / 3``. Other nodes watch the prefix, so a node that stops refreshing (crashed, or cut
off from etcd) disappears from their view when its lease expires; a node that stops cleanly revokes its lease and
disappears at once.

A node that cannot refresh its lease for ``ttl`` seconds must assume it has lost it: ``healthy`` turns false and
``on_lease_lost`` runs, so the node stops accepting writes for partitions it owned (another node may own them by
now). It then keeps trying to register again with a new lease, or, if its old lease turns out to be alive after
all (an etcd restart renews every lease), carries on with that one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from shoalmq.cluster.etcd import Etcd, KeyValue, PrefixWatch, WatchEvent
from shoalmq.errors import ShoalError

log = logging.getLogger(__name__)


class NodeIdInUse(ShoalError):
    """Another live node is registered with this node id."""


class Membership:
    """This node's registration and the set of live nodes."""

    def __init__(self, etcd: Etcd, cluster: str, node_id: str, info: dict[str, Any], ttl: int = 5) -> None:
        self.etcd = etcd
        self.cluster = cluster
        self.node_id = node_id
        self.info = {**info, "node_id": node_id, "started": int(time.time())}
        self.ttl = ttl
        self.prefix = f"/{cluster}/nodes/".encode()
        self.key = self.prefix + node_id.encode()
        #: Live nodes: node id -> the JSON they registered.
        self.nodes: dict[str, dict[str, Any]] = {}
        self.lease = 0
        self.healthy = False
        self.on_change: list[Callable[[dict[str, dict[str, Any]]], None]] = []
        self.on_lease_lost: list[Callable[[], None]] = []
        self.on_lease_regained: list[Callable[[], None]] = []
        self._watch: PrefixWatch | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        #: Set while the node leaves: a lost lease is not replaced by a new registration (which would make the
        #: others assign partitions to a node on its way out); an old lease found alive is still used.
        self.leaving = False
        #: Until when (loop monotonic clock) this node may trust that its lease is alive: the send time of the
        #: last refresh etcd answered, plus the TTL, minus a margin. etcd counts the TTL from when it received
        #: that refresh, which is after the send time, so etcd can never expire the lease before this deadline.
        self.valid_until = 0.0

    async def start(self) -> None:
        """Register (NodeIdInUse if a live node holds this id) and start watching the members."""
        await self._register()
        self._watch = PrefixWatch(self.etcd, self.prefix, self._on_snapshot, self._on_events)
        await self._watch.start()
        self._keepalive_task = asyncio.create_task(self._keepalive(), name="shoalmq-lease")

    async def stop(self) -> None:
        """Leave: revoke the lease (the node key goes with it) and stop watching."""
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            await asyncio.gather(self._keepalive_task, return_exceptions=True)
        if self._watch is not None:
            self._watch.stop()
        if self.lease:
            try:
                await self.etcd.call(self.etcd.revoke_sync, self.lease)
            except ShoalError as exc:
                log.warning("could not revoke lease on leaving: %s (the key expires with it)", exc)
        self.healthy = False

    def serving(self) -> list[str]:
        """The live nodes that take partitions: not draining (``broker cluster drain``), sorted."""
        return sorted(n for n, info in self.nodes.items() if not info.get("draining"))

    @property
    def draining(self) -> bool:
        """This node is being drained: it hands its partitions to the others and takes none."""
        return bool(self.info.get("draining"))

    #: Seconds of the TTL not trusted (clock rate differences, scheduling delays).
    SAFETY_MARGIN = 0.5

    def lease_valid(self) -> bool:
        """True while the lease is certainly alive in etcd (so nobody else can own this node's partitions)."""
        return self.healthy and time.monotonic() < self.valid_until

    async def _register(self) -> None:
        sent = time.monotonic()
        lease = await self.etcd.call(self.etcd.grant_sync, self.ttl)
        value = json.dumps(self.info, sort_keys=True).encode()
        created, existing = await self.etcd.call(self.etcd.create_sync, self.key, value, lease)
        if not created:
            if existing is not None and existing.lease == self.lease and self.lease:
                # Our own key, still on our old lease, which is alive after all: keep that one.
                await self.etcd.call(self.etcd.revoke_sync, lease)
                sent = time.monotonic()
                if await self.etcd.call(self.etcd.keepalive_sync, self.lease) <= 0:
                    raise ShoalError("the old lease expired meanwhile")
                lease = self.lease
            else:
                await self.etcd.call(self.etcd.revoke_sync, lease)
                raise NodeIdInUse(f"node id {self.node_id!r} is registered by a live node in cluster "
                                  f"{self.cluster!r}; pick another --node-id")
        self.lease = lease
        self.healthy = True
        self._last_refresh = time.monotonic()
        self.valid_until = sent + self.ttl - self.SAFETY_MARGIN
        log.info("registered as %s in cluster %s (lease %x, ttl %d s)", self.node_id, self.cluster, lease, self.ttl)

    async def _keepalive(self) -> None:
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            sent = time.monotonic()
            try:
                ttl = await self.etcd.call(self.etcd.keepalive_sync, self.lease)
            except ShoalError as exc:
                ttl = None
                log.warning("lease refresh failed: %s", exc)
            if ttl is not None and ttl > 0:
                self._last_refresh = time.monotonic()
                self.valid_until = sent + ttl - self.SAFETY_MARGIN
                if not self.healthy:
                    # The lease outlived the outage (an etcd restart renews every lease's TTL): it never expired,
                    # so nothing of ours was deleted or taken over. Carry on with it.
                    self.healthy = True
                    log.warning("lease of node %s still alive after all: accepting writes again", self.node_id)
                    for callback in self.on_lease_regained:
                        callback()
                continue
            if self.healthy and (ttl == -1 or time.monotonic() >= self.valid_until):
                self.healthy = False
                log.error("lease of node %s lost: no longer writing the partitions owned on it (replicated ones "
                          "go on: their in-sync followers fence them)", self.node_id)
                for callback in self.on_lease_lost:
                    callback()
            if not self.healthy and not self.leaving:
                try:
                    await self._register()
                except NodeIdInUse as exc:
                    log.error("%s: this node stays out of the cluster (it takes no writes) until restarted", exc)
                    return
                except ShoalError as exc:
                    log.warning("cannot register again yet: %s", exc)

    async def update(self, **changes: Any) -> None:
        """Change what this node registered (``draining``, ``leaving``...) and write it, on the same lease."""
        self.info.update(changes)
        if self.lease and self.healthy:
            value = json.dumps(self.info, sort_keys=True).encode()
            await self.etcd.call(self.etcd.put_sync, self.key, value, self.lease)

    def _on_snapshot(self, kvs: list[KeyValue]) -> None:
        before = self.nodes
        self.nodes = {}
        for kv in kvs:
            self._apply_put(kv)
        if before:  # (a watch that started over: say what changed meanwhile)
            for node_id in sorted(set(before) - set(self.nodes)):
                log.info("node %s is gone from the cluster", node_id)
            for node_id in sorted(set(self.nodes) - set(before)):
                log.info("node %s joined the cluster (%s)", node_id, self.nodes[node_id].get("mqtt", "?"))
        self._changed()

    def _on_events(self, events: list[WatchEvent]) -> None:
        for event in events:
            node_id = event.kv.key[len(self.prefix):].decode(errors="replace")
            if event.kind == "delete":
                info = self.nodes.pop(node_id, None)
                if node_id != self.node_id:
                    if info is not None and info.get("leaving"):
                        log.info("node %s left the cluster", node_id)
                    else:
                        log.info("node %s left the cluster without saying so: its lease expired (it crashed, was "
                                 "stopped or paused, or lost etcd) or it was removed", node_id)
            else:
                known = self.nodes.get(node_id)
                self._apply_put(event.kv)
                info = self.nodes.get(node_id, {})
                if node_id != self.node_id and known is None:
                    log.info("node %s joined the cluster (MQTT %s)", node_id, info.get("mqtt", "?"))
                elif known is not None and node_id != self.node_id and (
                        bool(known.get("draining")) != bool(info.get("draining"))):
                    log.info("node %s %s", node_id, "is draining: its partitions move to the other nodes"
                             if info.get("draining") else "is no longer draining")
        self._changed()

    def _apply_put(self, kv: KeyValue) -> None:
        node_id = kv.key[len(self.prefix):].decode(errors="replace")
        try:
            self.nodes[node_id] = json.loads(kv.value)
        except ValueError:
            log.warning("ignoring node %s: its registration is not JSON", node_id)

    def _changed(self) -> None:
        for callback in self.on_change:
            callback(dict(self.nodes))
