"""Queue definitions in etcd: the first node to see a queue records its settings; every node serves them.

``/<cluster>/queues/<name>`` is written once, create-if-absent, by whichever node first sees the queue (a publish,
a subscription, its ``queues:`` configuration, or its data directory). A node whose data directory or
configuration has another partition count for a queue the cluster knows cannot serve it (at start: it refuses to
start); other settings are taken from the cluster, with a warning.

Deleting a queue (``delete``, from any node) takes these steps:

1. One transaction, only if the definition is still the one read and no delete of the queue is under way: delete
   the definition, put ``/<cluster>/deleting/<name>`` on the deleting node's lease (while it exists, no node may
   define the queue again: a publish to it is refused), and put the tombstone ``/<cluster>/deleted/<name>`` (kept:
   a node that was down learns of the delete from it when it starts).
2. Every node, on seeing the definition go (its watch; the deleting node too), stops leading, following and
   writing the queue's partitions, drops what it stores of them, and once that is durable deletes its ownership
   keys of them and puts ``/<cluster>/dropped/<name>/<node>`` (on its lease) with the count it removed.
3. The deleting node waits until every live node has confirmed (or ``DELETE_TIMEOUT``), deletes what is left
   under ``/<cluster>/partitions/<name>/`` (replicated partitions' records, the keys of nodes that are gone) and
   the confirmations, and last the ``deleting`` key: from then on a publish creates the queue anew.

A node that was down reads the tombstones before it joins (``drop_deleted``): each node records in its data
directory which incarnation of a queue its copy is (the create revision of the definition: ``record_revisions``),
so a copy of a queue deleted, or deleted and created again, while it was away is dropped.

A publish a node acknowledged before it saw the definition go is deleted with the queue (it was published before
the delete ended). If the deleting node dies midway, its ``deleting`` key goes with its lease: the queue stays
deleted, and the records left under ``partitions/`` are replaced as the queue is created again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from shoalmq.cluster.etcd import Etcd
from shoalmq.cluster.view import ClusterView, parse_definition
from shoalmq.errors import ConfigError, QueueError, ShoalError
from shoalmq.queue.config import QueueConfig

if TYPE_CHECKING:
    from shoalmq.queue.manager import QueueManager

log = logging.getLogger(__name__)

#: Seconds a delete waits for every live node to confirm it dropped the queue, and between two looks.
DELETE_TIMEOUT = 20.0
DELETE_POLL = 0.1


class QueueDefinitions:
    """Defines queues in the cluster and checks this node's against it."""

    def __init__(self, etcd: Etcd, view: ClusterView, manager: QueueManager) -> None:
        self.etcd = etcd
        self.view = view
        self.manager = manager
        self._defining: dict[str, asyncio.Future[QueueConfig]] = {}
        self._unservable: set[str] = set()
        #: Set once ``check_local_queues`` has run: from then on this node's copy of a queue is recorded as of the
        #: incarnation the cluster defines (before, it may be of one deleted while this node was away).
        self._checked = False

    def queue_config(self, name: str) -> QueueConfig | None:
        return self.view.definitions.get(name)

    def define(self, name: str, config: QueueConfig) -> asyncio.Future[QueueConfig]:
        """Record the queue in etcd unless it is there already; resolves to the settings every node uses."""
        future = self._defining.get(name)
        if future is None:
            future = self._defining[name] = asyncio.ensure_future(self._define(name, config))
            future.add_done_callback(lambda f: self._defining.pop(name, None))
        return future

    async def _define(self, name: str, config: QueueConfig) -> QueueConfig:
        key = self.view.queues_prefix + name.encode()
        config = config.resolved(clustered=True)
        value = json.dumps({**asdict(config), "created": int(time.time())}, sort_keys=True).encode()
        created, existing = await self.etcd.call(self.etcd.create_sync, key, value, 0,
                                                 self.view.deleting_prefix + name.encode())
        if not created and existing is None:
            raise QueueError(f"queue {name!r} is being deleted in the cluster; publish again once it is")
        if not created and existing is not None:
            config = parse_definition(existing.value)
        elif created:
            log.info("queue %s defined in the cluster: %d partition(s)", name, config.partitions)
        definitions = self.view.definitions
        definitions.setdefault(name, config)
        for callback in self.view.on_definitions:
            callback()
        return definitions[name]

    async def drop_deleted(self) -> None:
        """Before this node joins the cluster (so that no peer hands it anything of the queue meanwhile): drop its
        copy of each queue the cluster deleted while it was away. A copy is of a deleted incarnation if the queue
        has a tombstone and is not defined any more, or is defined again at another revision than the one this
        copy recorded (``record_revisions``)."""
        view = self.view
        tombstones, _ = await self.etcd.call(self.etcd.get_prefix_sync, view.deleted_prefix)
        deleted = {kv.key[len(view.deleted_prefix):].decode(errors="replace") for kv in tombstones}
        if not deleted:
            return
        definitions, _ = await self.etcd.call(self.etcd.get_prefix_sync, view.queues_prefix)
        defined = {kv.key[len(view.queues_prefix):].decode(errors="replace"): kv.create_revision
                   for kv in definitions}
        dropped = False
        for queue in self.manager.queues():
            if queue.name not in deleted:
                continue
            mine = (self.manager.store.queue_definition(queue.name) or {}).get("cluster_revision")
            if queue.name not in defined or (isinstance(mine, int) and mine != defined[queue.name]):
                removed = sum(self.manager.drop(queue.name).values())
                dropped = True
                log.info("queue %s was deleted in the cluster while this node was away: %d message(s) removed from "
                         "this node", queue.name, removed)
        if dropped:
            await self.manager.store.flush()

    async def check_local_queues(self) -> None:
        """Queues this node stored before (created in an earlier run) or declares are defined in the cluster
        too (those the cluster deleted while it was away are dropped before: ``drop_deleted``); ConfigError for
        one the cluster knows with another partition count."""
        for queue in self.manager.queues():
            defined = self.view.definitions.get(queue.name) or await self._define(queue.name, queue.config)
            if defined.partitions != len(queue.partitions):
                raise ConfigError(f"queue {queue.name!r} has {defined.partitions} partitions in cluster "
                                  f"{self.view.cluster} but {len(queue.partitions)} on this node (its data "
                                  f"directory or configuration); a queue's partition count cannot change")
            if defined != queue.config:
                log.warning("queue %s: using the cluster's settings, not this node's (%s)", queue.name,
                            ", ".join(f"{k}={v}" for k, v in sorted(asdict(defined).items())
                                      if getattr(queue.config, k) != v))
                self.manager.adopt_config(queue.name, defined)
        self._checked = True
        self.record_revisions()

    def record_revisions(self, name: str | None = None) -> None:
        """Record in the data directory which incarnation of the queue (``None``: of each open queue) this node's
        copy is: the create revision of the cluster's definition. A node back from being away compares it with the
        tombstone of a delete (``check_local_queues``)."""
        if not self._checked:
            return
        store = self.manager.store
        for queue in [name] if name is not None else [q.name for q in self.manager.queues()]:
            revision = self.view.revisions.get(queue)
            stored = store.queue_definition(queue)
            if revision and stored is not None and stored.get("cluster_revision") != revision:
                store.define_queue(queue, {**stored, "cluster_revision": revision}, replace=True)

    def servable(self, name: str) -> bool:
        """Open the queue here (False, logged once, if this node cannot serve it)."""
        try:
            self.manager.queue(name)
            return True
        except ShoalError as exc:
            if name not in self._unservable:
                self._unservable.add(name)
                log.error("queue %s cannot be served by this node: %s", name, exc)
            return False

    # -- deleting -------------------------------------------------------------------------------------------

    async def confirm_dropped(self, name: str, removed: int) -> None:
        """Step 2's end: this node dropped the queue (durably) and released its keys."""
        key = self.view.dropped_prefix + f"{name}/{self.view.node_id}".encode()
        value = json.dumps({"messages": removed}).encode()
        # (only while the delete is under way: a late word would stay on this node's lease for nothing)
        await self.etcd.call(self.etcd.put_while_sync, key, value, self.view.membership.lease,
                             self.view.deleting_prefix + name.encode())

    async def delete(self, name: str, timeout: float = DELETE_TIMEOUT) -> dict[str, Any]:
        """Delete the queue in the whole cluster (see the module docstring). Returns what each node removed, and
        the live nodes that did not confirm in time (they drop it when their watch shows the delete). UnknownQueue
        if the cluster has no such queue; QueueInUse if it is being deleted already."""
        from shoalmq.queue.manager import QueueInUse, UnknownQueue

        view = self.view
        key = view.queues_prefix + name.encode()
        current = await self.etcd.call(self.etcd.get_sync, key)
        if current is None:
            raise UnknownQueue(f"no queue {name!r} in cluster {view.cluster}")
        marker = view.deleting_prefix + name.encode()
        started = int(time.time())
        done = await self.etcd.call(
            self.etcd.delete_queue_sync, key, current.create_revision, marker,
            json.dumps({"node": view.node_id, "started": started}).encode(), view.membership.lease,
            view.deleted_prefix + name.encode(),
            json.dumps({"node": view.node_id, "deleted": started, "created_revision": current.create_revision}
                       ).encode())
        if not done:
            raise QueueInUse(f"queue {name!r} is being deleted already, or was just created again")
        log.info("deleting queue %s in the cluster", name)
        dropped_prefix = view.dropped_prefix + f"{name}/".encode()
        deadline = time.monotonic() + timeout
        removed: dict[str, int] = {}
        try:
            while True:
                kvs, _ = await self.etcd.call(self.etcd.get_prefix_sync, dropped_prefix)
                for kv in kvs:
                    try:
                        removed[kv.key[len(dropped_prefix):].decode()] = int(json.loads(kv.value)["messages"])
                    except (ValueError, KeyError, TypeError):
                        removed[kv.key[len(dropped_prefix):].decode()] = 0
                waiting = sorted(set(view.nodes) - set(removed))
                if not waiting or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(DELETE_POLL)
            partitions = view.partitions_prefix + f"{name}/".encode()
            await self.etcd.call(self.etcd.delete_prefix_sync, partitions)
            await self.etcd.call(self.etcd.delete_prefix_sync, dropped_prefix)
        finally:
            await self.etcd.call(self.etcd.delete_sync, marker)
        if waiting:
            log.warning("queue %s deleted; node(s) %s did not confirm within %.0f s (they drop it when they see the "
                        "delete)", name, ", ".join(waiting), timeout)
        else:
            log.info("queue %s deleted in the cluster: %d message(s) removed on %d node(s)", name,
                     sum(removed.values()), len(removed))
        return {"queue": name, "deleted": True, "messages": sum(removed.values()), "nodes": removed,
                "unconfirmed": waiting}
