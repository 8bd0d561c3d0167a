"""What one node knows of the cluster: live nodes, queue definitions, partition owners and their epochs.

One ``ClusterView`` per node. The watches here fill it (each a ``PrefixWatch``, so they survive etcd restarts and
compactions), ``Ownership`` records in it the partitions this node holds, and everyone else only reads it: the
forwarder (where does a publish go), the router (which proxies are stale), the load report and the servicer.

- ``/<cluster>/queues/<name>``: a queue's settings, written once by whichever node first sees the queue
  (create-if-absent), so every node agrees on its partition count and limits;
- ``/<cluster>/partitions/<queue>/<p>``: the owner of a partition, on the owner's lease. The key's create revision
  is the partition's **epoch**: every ownership is a new key, so a new owner always has a higher epoch. For a
  replicated queue, the key holds instead the partition's record (leader, epoch, replicas, in-sync set; no lease),
  kept in ``records``, and its leader shows in ``owners`` as the owner;
- ``/<cluster>/nodes/<id>``: the live nodes (``Membership`` watches those).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from shoalmq.cluster.etcd import Etcd, KeyValue, PrefixWatch, WatchEvent
from shoalmq.cluster.membership import Membership
from shoalmq.cluster.replication_record import Record, parse_record
from shoalmq.errors import ShoalError
from shoalmq.queue.config import QueueConfig

log = logging.getLogger(__name__)

Partition = tuple[str, int]


class Owner:
    """A partition's owner as etcd records it."""

    __slots__ = ("epoch", "lease", "node")

    def __init__(self, node: str, epoch: int, lease: int) -> None:
        self.node = node
        self.epoch = epoch
        self.lease = lease


class ClusterView:
    """The cluster as this node sees it (see the module docstring)."""

    def __init__(self, etcd: Etcd, membership: Membership) -> None:
        self.etcd = etcd
        self.membership = membership
        self.node_id = membership.node_id
        self.cluster = membership.cluster
        self.queues_prefix = f"/{self.cluster}/queues/".encode()
        self.partitions_prefix = f"/{self.cluster}/partitions/".encode()
        #: A queue being deleted (on the deleting node's lease), the queues deleted (kept), and the nodes that
        #: dropped a queue being deleted (``definitions``: deleting a queue of a cluster).
        self.deleting_prefix = f"/{self.cluster}/deleting/".encode()
        self.deleted_prefix = f"/{self.cluster}/deleted/".encode()
        self.dropped_prefix = f"/{self.cluster}/dropped/".encode()
        #: Queue name -> its settings as stored in etcd.
        self.definitions: dict[str, QueueConfig] = {}
        #: Queue name -> the etcd create revision of its definition, for the definitions the watch showed: which
        #: incarnation of the queue it is (a queue deleted and created again is a new one). Not those a define put
        #: in ``definitions`` before the watch shows them: only one of these missing from a new snapshot was deleted.
        self.revisions: dict[str, int] = {}
        #: (queue, partition) -> its owner as recorded in etcd.
        self.owners: dict[Partition, Owner] = {}
        #: (queue, partition) -> the highest epoch the view has shown (kept when the key goes).
        self.max_epoch: dict[Partition, int] = {}
        #: (queue, partition) -> the node whose key of it the watch last showed deleted (why a claim found it free).
        self.former: dict[Partition, str] = {}
        #: (queue, partition) -> epoch, for the partitions this node holds the key of and writes to (kept by
        #: ``Ownership``: a partition is here only while this node may write it, lease permitting), or leads (kept
        #: by ``Replicator``; those have a record, and are held without the lease: see ``held``).
        self.mine: dict[Partition, int] = {}
        #: (queue, partition) -> the record of a replicated partition (leader, epoch, replicas, in-sync set).
        self.records: dict[Partition, Record] = {}
        #: Called after the definitions change.
        self.on_definitions: list[Callable[[], None]] = []
        #: Called with the name of a queue whose definition was deleted (the queue is being deleted), first.
        self.on_deleted: list[Callable[[str], None]] = []
        #: Called after the owners change.
        self.on_owners: list[Callable[[], None]] = []
        self._watches: list[PrefixWatch] = []

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        """Live nodes: node id -> what they registered (addresses, version, start time)."""
        return self.membership.nodes

    def held(self, part: Partition, lease_valid: bool) -> bool:
        """This node may write the partition now: it is in ``mine``, and either its lease is certainly alive or the
        partition is replicated (its in-sync followers fence it, not the lease)."""
        return part in self.mine and (lease_valid or part in self.records)

    def partition_key(self, part: Partition) -> bytes:
        return self.partitions_prefix + f"{part[0]}/{part[1]}".encode()

    async def start(self) -> None:
        for prefix, snapshot, events in ((self.queues_prefix, self._queues_snapshot, self._queues_events),
                                         (self.partitions_prefix, self._owners_snapshot, self._owners_events)):
            watch = PrefixWatch(self.etcd, prefix, snapshot, events)
            await watch.start()
            self._watches.append(watch)

    def stop(self) -> None:
        for watch in self._watches:
            watch.stop()

    # -- queue definitions ----------------------------------------------------------------------------------

    def _queues_snapshot(self, kvs: list[KeyValue]) -> None:
        # (a watch that started again after a compaction: a definition that went meanwhile was deleted)
        present = {kv.key[len(self.queues_prefix):].decode(errors="replace") for kv in kvs}
        for name in [name for name in self.revisions if name not in present]:
            self._deleted(name)
        for kv in kvs:
            self._define(kv)
        for callback in self.on_definitions:
            callback()

    def _queues_events(self, events: list[WatchEvent]) -> None:
        for event in events:  # (in order: a queue deleted and created again is dropped, then defined anew)
            if event.kind == "put":
                self._define(event.kv)
            else:
                self._deleted(event.kv.key[len(self.queues_prefix):].decode(errors="replace"))
        for callback in self.on_definitions:
            callback()

    def _define(self, kv: KeyValue) -> None:
        name = kv.key[len(self.queues_prefix):].decode(errors="replace")
        self.revisions[name] = kv.create_revision
        try:
            self.definitions[name] = parse_definition(kv.value)
        except (ValueError, TypeError, ShoalError) as exc:
            log.error("queue %s has unusable settings in etcd (%s); ignoring it", name, exc)

    def _deleted(self, name: str) -> None:
        self.revisions.pop(name, None)
        if self.definitions.pop(name, None) is not None:
            for callback in self.on_deleted:
                callback(name)

    # -- owners ---------------------------------------------------------------------------------------------

    def _owners_snapshot(self, kvs: list[KeyValue]) -> None:
        self.owners = {}
        self.records = {}
        for kv in kvs:
            self._owner_put(kv)
        self._owners_changed()

    def _owners_events(self, events: list[WatchEvent]) -> None:
        for event in events:
            if event.kind == "put":
                self._owner_put(event.kv)
            else:
                part = self._partition_of(event.kv.key)
                gone = self.owners.pop(part, None)
                if gone is not None and part not in self.records:
                    self.former[part] = gone.node
                self.records.pop(part, None)
        self._owners_changed()

    def _partition_of(self, key: bytes) -> Partition:
        queue, _, index = key[len(self.partitions_prefix):].decode(errors="replace").rpartition("/")
        return queue, int(index) if index.isdigit() else -1

    def _owner_put(self, kv: KeyValue) -> None:
        record = parse_record(kv.value, kv.mod_revision)
        if record is not None:
            self.record_replica(self._partition_of(kv.key), record)
            return
        try:
            owner = json.loads(kv.value)["owner"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable ownership record %r", kv.key)
            return
        self.record_owner(self._partition_of(kv.key), Owner(owner, kv.create_revision, kv.lease))

    def record_owner(self, part: Partition, owner: Owner) -> None:
        """An owner this node learned of (from the watch, or its own claim before the watch shows it)."""
        self.owners[part] = owner
        self.max_epoch[part] = max(self.max_epoch.get(part, 0), owner.epoch)

    def record_replica(self, part: Partition, record: Record) -> None:
        """A replicated partition's record (from the watch, or a swap of ours before the watch shows it); an older
        revision than the one known is ignored. Its leader shows in ``owners`` as the owner, at its epoch."""
        known = self.records.get(part)
        if known is not None and known.revision > record.revision:
            return
        self.records[part] = record
        self.record_owner(part, Owner(record.leader, record.epoch, 0))

    def _owners_changed(self) -> None:
        for callback in self.on_owners:
            callback()


def parse_definition(value: bytes) -> QueueConfig:
    """A queue's settings as stored in ``/<cluster>/queues/<name>`` (JSON; ``created`` is informational)."""
    values = json.loads(value)
    values.pop("created", None)
    # Written before queues were replicated: such a queue's partitions live on their owners' leases.
    values["replication_factor"] = values.get("replication_factor") or 1
    return QueueConfig.from_mapping(values)
