"""A node's part in the cluster: queue definitions, partition ownership, and where each publish goes.

Views (each from a ``PrefixWatch``, so they survive etcd restarts and compactions):

- ``/<cluster>/queues/<name>``: a queue's settings, written once by whichever node first sees the queue
  (create-if-absent), so every node agrees on its partition count and limits.
- ``/<cluster>/partitions/<queue>/<p>``: the owner of a partition, on the owner's lease. The key's create revision
  is the partition's **epoch**: every ownership is a new key, so a new owner always has a higher epoch.
- the live nodes (``Membership``).

Ownership. The ``PartitionAssigner`` says who *should* own each partition, given the live nodes; a node claims a
partition it should own by creating its key (create-if-absent, on its lease), and only once the key is absent: a
previous owner gives the key up after handing its messages over (graceful), or its lease expires (crash). So two
nodes never own a partition at once, and a node writes to a partition only while it holds the key and its lease is
certainly alive (``Membership.lease_valid``): a node cut off from etcd stops writing before etcd can expire its
lease and let another node claim.

Publishes. A publish to a partition this node owns is appended locally. Any other is forwarded to the owner over
the peer's ``EnqueueRemote`` stream: every message forwarded to a peer in one loop turn travels in one gRPC
message, with one future per partition; the owner answers once they are durable, and only then are the
publishers acknowledged. A batch that the owner refuses as
not-owner or stale-epoch, or that is lost with a dying peer, is sent again to whoever owns the partition then (the
view is refreshed by the watch), for up to ``FORWARD_TIMEOUT`` seconds; a partition with no owner at the moment
(between a crash and the takeover) holds its publishes meanwhile.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from shoalmq.cluster.assignment import PartitionAssigner
from shoalmq.cluster.etcd import Etcd, KeyValue, PrefixWatch, WatchEvent
from shoalmq.cluster.membership import Membership
from shoalmq.cluster.routing import Router
from shoalmq.cluster.transport import EnqueueClient, peer_ready
from shoalmq.errors import ConfigError, NotOwner, ShoalError, StaleEpoch
from shoalmq.queue.config import QueueConfig

if TYPE_CHECKING:
    from shoalmq.queue.manager import QueueManager

log = logging.getLogger(__name__)

#: Seconds a forwarded publish may wait for an owner that takes it before the publish fails.
FORWARD_TIMEOUT = 30.0
#: Seconds between attempts to send forwarded publishes that found no owner, or were refused as not-owner.
FORWARD_RETRY = 0.05
#: Seconds between reconciliations when nothing changes (a change triggers one at once).
RECONCILE_INTERVAL = 1.0
#: Messages per chunk when a partition's messages move to another node.
MOVE_CHUNK = 500
#: Seconds between updates of this node's ``/<cluster>/load/<node>`` key (only written when it changed).
LOAD_INTERVAL = 2.0
#: Seconds a handoff waits for the new owner's gRPC server to accept a connection before it gives up for now
#: (nothing is taken back or paused until it does: a node whose old registration is still in etcd after a crash,
#: or that is still starting, costs nothing but this probe).
HANDOFF_PROBE_TIMEOUT = 1.0
#: Seconds a handoff lets consumers ack the partition's deliveries they hold before taking the rest back (a
#: delivery taken back is delivered again by the new owner, and its late ack counts for nothing).
HANDOFF_ACK_GRACE = 1.0
#: Backoff between handoff attempts to a node that failed one: doubling from the first to the last.
HANDOFF_BACKOFF = (0.25, 5.0)


class Owner:
    __slots__ = ("epoch", "lease", "node")

    def __init__(self, node: str, epoch: int, lease: int) -> None:
        self.node = node
        self.epoch = epoch
        self.lease = lease


class _Forward:
    """Forwarded publishes of one loop turn to one partition, and the future their publishers wait on."""

    __slots__ = ("deadline", "future", "groups", "held", "outstanding", "seq")

    def __init__(self, seq: int, groups: dict[tuple[str, int], list[bytes]], future: asyncio.Future[None],
                 deadline: float) -> None:
        self.seq = seq  # turn order: held forwards are retried oldest first
        self.groups = groups
        self.future = future
        self.deadline = deadline
        self.outstanding = 0
        self.held = False


class Coordinator:
    """Queue definitions, ownership and publish routing of one node (see the module docstring)."""

    def __init__(self, etcd: Etcd, membership: Membership, manager: QueueManager, assigner: PartitionAssigner,
                 routing: str = "proxy") -> None:
        self.etcd = etcd
        self.membership = membership
        self.manager = manager
        self.assigner = assigner
        self.routing = routing
        self.node_id = membership.node_id
        cluster = membership.cluster
        self.queues_prefix = f"/{cluster}/queues/".encode()
        self.partitions_prefix = f"/{cluster}/partitions/".encode()
        self.load_prefix = f"/{cluster}/load/".encode()
        #: Queue name -> its settings as stored in etcd.
        self.definitions: dict[str, QueueConfig] = {}
        #: (queue, partition) -> its owner as recorded in etcd.
        self.owners: dict[tuple[str, int], Owner] = {}
        #: (queue, partition) -> the highest epoch the view has shown (kept when the key goes).
        self.max_epoch: dict[tuple[str, int], int] = {}
        #: (queue, partition) -> epoch, for the partitions this node holds the key of.
        self.mine: dict[tuple[str, int], int] = {}
        self._clients: dict[str, EnqueueClient] = {}
        self._loop = asyncio.get_running_loop()
        self._turn: dict[tuple[str, int], tuple[list[bytes], asyncio.Future[None]]] = {}
        self._held: list[_Forward] = []
        #: Partitions with forwarded groups not yet stored (a local publish to them waits behind those).
        self._unsettled: dict[tuple[str, int], int] = {}
        #: Partitions with groups sent to another node and not yet answered -> the future of the gRPC message
        #: they ride in (all of a partition's groups on their way share one).
        self._on_the_way: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._forward_seq = 0
        self._retry_handle: asyncio.Handle | None = None
        self._defining: dict[str, asyncio.Future[QueueConfig]] = {}
        self._wake = asyncio.Event()
        self._watches: list[PrefixWatch] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: Set by ``leave``: this node hands everything over and takes nothing.
        self.leaving = False
        self._reconcile_lock = asyncio.Lock()
        self._unservable: set[str] = set()
        self.started = False
        self._next_load_report = 0.0
        self._last_load: dict[str, Any] | None = None
        self._last_load_lease = 0
        self.on_ownership_change: list[Callable[[], None]] = []
        #: Proxy routing's consumer side (None in direct mode).
        self.router: Router | None = Router(manager, self) if routing == "proxy" else None
        if self.router is not None:
            manager.on_consumers_changed = self.router.consumers_changed
        self.on_ownership_change.append(manager.refresh_sources)
        #: Partitions claimed but whose key the watch may not have shown yet.
        self._claimed_recently: set[tuple[str, int]] = set()
        #: (node, its registration's start time) -> (no handoff to it before this time, the current backoff).
        self._handoff_backoff: dict[tuple[str, Any], tuple[float, float]] = {}

    # -- life ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the views, then keep reconciling ownership with the assigner until ``stop``."""
        self.membership.on_change.append(self._nodes_changed)
        self.membership.on_lease_lost.append(self._lease_lost)
        self.membership.on_lease_regained.append(self._changed)
        for prefix, snapshot, events in ((self.queues_prefix, self._queues_snapshot, self._queues_events),
                                         (self.partitions_prefix, self._owners_snapshot, self._owners_events)):
            watch = PrefixWatch(self.etcd, prefix, snapshot, events)
            await watch.start()
            self._watches.append(watch)
        # Queues this node stored before (created in an earlier run) or declares are defined in the cluster too;
        # one the cluster knows with another partition count cannot be served here.
        for queue in self.manager.queues():
            defined = self.definitions.get(queue.name) or await self._define(queue.name, queue.config)
            if defined.partitions != len(queue.partitions):
                raise ConfigError(f"queue {queue.name!r} has {defined.partitions} partitions in cluster "
                                  f"{self.membership.cluster} but {len(queue.partitions)} on this node (its data "
                                  f"directory or configuration); a queue's partition count cannot change")
            if defined != queue.config:
                log.warning("queue %s: using the cluster's settings, not this node's (%s)", queue.name,
                            ", ".join(f"{k}={v}" for k, v in sorted(asdict(defined).items())
                                      if getattr(queue.config, k) != v))
                self.manager.adopt_config(queue.name, defined)
        self.manager.refresh_sources()  # nothing is owned yet: deliver nothing until claimed
        self._task = asyncio.create_task(self._run(), name="shoalmq-coordinator")
        self.started = True

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._wake.set()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for watch in self._watches:
            watch.stop()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        error = ShoalError("node shutting down before the owner stored the message")
        for forward in self._held:
            if not forward.future.done():
                forward.future.set_exception(error)
        self._held = []
        for client in list(self._clients.values()):
            await client.close()
        self._clients.clear()
        if self.router is not None:
            await self.router.close()

    def _changed(self) -> None:
        self._wake.set()

    def _nodes_changed(self, nodes: dict[str, dict[str, Any]]) -> None:
        for node in [n for n in self._clients if n not in nodes]:
            asyncio.ensure_future(self._clients.pop(node).close())
        if self.router is not None:
            self.router.sync_peers()
        self._changed()

    async def _run(self) -> None:
        while not self._stopping:  # (not only cancellation: wait_for can swallow a cancel on 3.11)
            try:
                await asyncio.wait_for(self._wake.wait(), RECONCILE_INTERVAL)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                async with self._reconcile_lock:
                    await self._reconcile()
                await self._report_load()
            except ShoalError as exc:
                log.warning("cannot reconcile partition ownership now: %s", exc)
            except Exception:  # a bug must not end the loop that keeps ownership right
                log.exception("reconciling partition ownership failed")

    # -- views --------------------------------------------------------------------------------------------

    def _queues_snapshot(self, kvs: list[KeyValue]) -> None:
        self.definitions = {}
        self._queues_apply(kvs)

    def _queues_events(self, events: list[WatchEvent]) -> None:
        self._queues_apply([e.kv for e in events if e.kind == "put"])

    def _queues_apply(self, kvs: list[KeyValue]) -> None:
        for kv in kvs:
            name = kv.key[len(self.queues_prefix):].decode(errors="replace")
            try:
                values = json.loads(kv.value)
                values.pop("created", None)
                self.definitions[name] = QueueConfig.from_mapping(values)
            except (ValueError, TypeError, ShoalError) as exc:
                log.error("queue %s has unusable settings in etcd (%s); ignoring it", name, exc)
        self._changed()

    def _owners_snapshot(self, kvs: list[KeyValue]) -> None:
        self.owners = {}
        for kv in kvs:
            self._owner_put(kv)
        self._owners_updated()

    def _owners_events(self, events: list[WatchEvent]) -> None:
        for event in events:
            if event.kind == "put":
                self._owner_put(event.kv)
            else:
                self.owners.pop(self._partition_of(event.kv.key), None)
        self._owners_updated()

    def _partition_of(self, key: bytes) -> tuple[str, int]:
        queue, _, index = key[len(self.partitions_prefix):].decode(errors="replace").rpartition("/")
        return queue, int(index) if index.isdigit() else -1

    def _owner_put(self, kv: KeyValue) -> None:
        try:
            owner = json.loads(kv.value)["owner"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable ownership record %r", kv.key)
            return
        part = self._partition_of(kv.key)
        self.owners[part] = Owner(owner, kv.create_revision, kv.lease)
        self.max_epoch[part] = max(self.max_epoch.get(part, 0), kv.create_revision)

    def _owners_updated(self) -> None:
        # A key of ours that is gone (or now someone else's) is no longer ours, whatever we thought.
        lost = [p for p, epoch in self.mine.items()
                if (o := self.owners.get(p)) is None or o.node != self.node_id or o.epoch != epoch]
        for part in lost:
            if self.owners.get(part) is None and part in self._claimed_recently:
                continue  # our own claim, not yet seen by the watch
            del self.mine[part]
            log.info("partition %s/%d is no longer owned here", *part)
        if lost:
            self._ownership_changed()
        if self.router is not None:
            self.router.prune()
        self._changed()
        self._retry_held()

    # -- ownership ------------------------------------------------------------------------------------------

    def writable(self, queue: str, partition: int) -> bool:
        """May a publish be appended to the partition here, now? (This node holds the key, its lease is certainly
        alive, and no earlier publish to the partition is still being forwarded.)"""
        part = (queue, partition)
        return part in self.mine and part not in self._unsettled and self.membership.lease_valid()

    def check(self, queue: str, partition: int, epoch: int) -> None:
        """``Ownership`` for forwarded batches: NotOwner or StaleEpoch unless this node owns it at ``epoch``."""
        mine = self.mine.get((queue, partition))
        if mine is None or not self.membership.lease_valid():
            raise NotOwner(f"node {self.node_id} does not own {queue}/{partition}")
        if mine != epoch:
            raise StaleEpoch(f"{queue}/{partition} is at epoch {mine} on {self.node_id}, not {epoch}")

    def owned_partitions(self, queue: str) -> list[int]:
        return sorted(p for (q, p) in self.mine if q == queue)

    def proxies(self, queue: str) -> list[Any]:
        return self.router.sources(queue) if self.router is not None else []

    def _lease_lost(self) -> None:
        if self.mine:
            log.error("lease lost: giving up %d partition(s) until registered again", len(self.mine))
            self.mine.clear()
            self._ownership_changed()

    def _ownership_changed(self) -> None:
        for callback in self.on_ownership_change:
            callback()

    async def _reconcile(self) -> None:
        """Bring ownership in line with the assigner: claim the partitions this node should own once their keys
        are free, hand over the ones another live node should own, and move messages left here (after a crash,
        or a handoff received for a partition that went elsewhere) to their owners."""
        if self._stopping or not self.membership.lease_valid():
            return
        nodes = self.membership.nodes
        live = sorted(n for n in nodes if not (self.leaving and n == self.node_id))
        if not live or (self.node_id not in live and not self.leaving):
            return  # our own registration is not in the view yet, or nobody is left to take over
        changed = False
        handoffs: list[tuple[tuple[str, int], str, int]] = []
        for name, config in list(self.definitions.items()):
            if not self._ensure_local(name):
                continue
            for index, wanted in enumerate(self.assigner.assign(name, config.partitions, live)):
                if self._stopping or not self.membership.lease_valid():
                    return
                part = (name, index)
                current = self.owners.get(part)
                if part in self.mine:
                    if wanted != self.node_id and wanted in nodes:
                        handoffs.append((part, wanted, self.mine[part]))
                        changed = True
                elif current is not None and current.node == self.node_id:
                    # A key of ours we do not write to: a handoff that did not finish, or a claim whose answer
                    # was lost. Take it up again, or finish handing it over.
                    if current.lease != self.membership.lease:
                        continue  # from an earlier lease: it expires on its own
                    if wanted == self.node_id:
                        self.mine[part] = current.epoch
                        self._ownership_changed()
                        changed = True
                    elif wanted in nodes:
                        handoffs.append((part, wanted, current.epoch))
                elif wanted == self.node_id:
                    if current is None and await self._claim(part):
                        changed = True
                elif current is not None and current.node in nodes:
                    await self._drain(part, current)
        if handoffs:
            await self._hand_off_all(handoffs)
        if changed:
            self._ownership_changed()
            self._retry_held()

    async def _hand_off_all(self, handoffs: list[tuple[tuple[str, int], str, int]]) -> None:
        """Hand partitions over, those to one node together: its readiness is probed once, and the partitions
        wait out one ack grace together (a node leaving with many partitions pauses each for one grace, not the
        sum of them)."""
        by_target: dict[str, list[tuple[tuple[str, int], int]]] = {}
        for part, target, epoch in handoffs:
            by_target.setdefault(target, []).append((part, epoch))
        await asyncio.gather(*(self._hand_off_to(target, parts) for target, parts in by_target.items()))

    async def _hand_off_to(self, target: str, parts: list[tuple[tuple[str, int], int]]) -> None:
        info = self.membership.nodes.get(target)
        if info is None or not info.get("grpc"):
            return
        backoff_key = (target, info.get("started"))
        not_before, delay = self._handoff_backoff.get(backoff_key, (0.0, 0.0))
        if time.monotonic() < not_before:
            return
        # Nothing is paused or taken back until the new owner answers: a node whose old registration is still in
        # etcd after a crash, or one still starting, would otherwise cost every try a pause and a take-back.
        if not await peer_ready(info["grpc"], HANDOFF_PROBE_TIMEOUT):
            delay = min(max(delay * 2, HANDOFF_BACKOFF[0]), HANDOFF_BACKOFF[1])
            self._handoff_backoff[backoff_key] = (time.monotonic() + delay, delay)
            log.info("not handing %d partition(s) over to %s yet: its gRPC server at %s does not answer (next try "
                     "in %.2f s)", len(parts), target, info["grpc"], delay)
            return
        self._handoff_backoff.pop(backoff_key, None)
        # Stop dispatching from the partitions and writing to them (publishes meanwhile are held), then give the
        # consumers a moment to ack what they hold.
        stopped = [(part, epoch) for part, epoch in parts if self.mine.pop(part, None) is not None]
        if stopped:
            self._ownership_changed()
        deadline = time.monotonic() + HANDOFF_ACK_GRACE
        while time.monotonic() < deadline and any(self.manager.held(*part) for part, _ in parts):
            await asyncio.sleep(0.02)
        failed = False
        for part, epoch in parts:
            if failed:  # the target failed: give the rest back to ourselves, try again later
                self._keep(part, epoch)
                continue
            failed = not await self._hand_off(part, target, epoch)
        if failed:
            delay = HANDOFF_BACKOFF[0]
            self._handoff_backoff[backoff_key] = (time.monotonic() + delay, delay)

    def _keep(self, part: tuple[str, int], epoch: int) -> None:
        """A handoff did not happen: own the partition again if its key is still ours at that epoch."""
        current = self.owners.get(part)
        if current is not None and current.node == self.node_id and current.epoch == epoch:
            self.mine[part] = epoch
            self._ownership_changed()

    async def _hand_off(self, part: tuple[str, int], target: str, epoch: int) -> bool:
        """Move the partition's messages to ``target`` (``TransferPartition``), then give up its key so that
        ``target`` can claim it (the caller stopped writing to it and dispatching from it). Publishes meanwhile
        wait (they are forwarded once the new owner holds the key); deliveries still in flight are taken back,
        uncounted, and delivered again by the new owner. False if the transfer failed (the partition is ours
        again)."""
        self.mine.pop(part, None)
        taken_back = self.manager.take_back(*part)
        log.info("handing partition %s/%d over to %s (%d delivery(ies) in flight taken back)", part[0], part[1],
                 target, taken_back)
        started = time.monotonic()
        try:
            await self.manager.store.flush()
            moved = await self._move(part, target, epoch, transfer=True)
        except (ShoalError, OSError) as exc:
            log.warning("handoff of %s/%d to %s failed (%s); keeping it for now", part[0], part[1], target, exc)
            self._keep(part, epoch)
            return False
        key = self.partitions_prefix + f"{part[0]}/{part[1]}".encode()
        if await self.etcd.call(self.etcd.delete_if_created_at_sync, key, epoch):
            current = self.owners.get(part)
            if current is not None and current.epoch == epoch:
                del self.owners[part]  # before the watch says so: no second handoff of it
        log.info("partition %s/%d handed over to %s: %d message(s) moved in %.0f ms", part[0], part[1], target,
                 moved, (time.monotonic() - started) * 1000)
        return True

    async def _drain(self, part: tuple[str, int], owner: Owner) -> None:
        """Move messages stored here for a partition another node owns to that owner (``EnqueueRemote``)."""
        queue = self.manager.queue(part[0])
        if not queue.partitions[part[1]].ready:
            return
        try:
            moved = await self._move(part, owner.node, owner.epoch, transfer=False)
        except (ShoalError, OSError) as exc:
            log.warning("cannot move messages of %s/%d to its owner %s yet: %s", part[0], part[1], owner.node, exc)
            return
        if moved:
            log.info("moved %d message(s) of %s/%d left here to its owner %s", moved, part[0], part[1], owner.node)

    async def _move(self, part: tuple[str, int], target: str, epoch: int, transfer: bool) -> int:
        """Send the partition's ready messages to ``target``, chunk by chunk; each chunk is acked (deleted) here
        once the target has it on disk. A chunk that fails goes back to the partition (it may have been stored
        there too: at least once)."""
        info = self.membership.nodes.get(target)
        if info is None or not info.get("grpc"):
            raise ShoalError(f"node {target} is not alive")
        part_log = self.manager.queue(part[0]).partitions[part[1]]
        client = EnqueueClient(info["grpc"], transfer=transfer)
        moved = 0
        try:
            while True:
                messages = part_log.take(MOVE_CHUNK)
                if not messages:
                    return moved
                offsets = [m.offset for m in messages]
                try:
                    await asyncio.wait_for(client.enqueue_records(part[0], part[1], epoch,
                                                                  [m.payload for m in messages]), FORWARD_TIMEOUT)
                except BaseException:
                    part_log.nack(offsets, counted=False)
                    raise
                part_log.ack(offsets)
                moved += len(messages)
        finally:
            await client.close()
            if moved:
                await self.manager.store.flush()

    async def leave(self, timeout: float = 30.0) -> None:
        """Leave gracefully: withdraw this node from the membership (others stop assigning it partitions) and hand
        every partition, and every message stored here, to the nodes that remain; at most ``timeout`` seconds
        (what is left stays on disk and is handed over when the node comes back)."""
        self.leaving = True
        try:
            await self.etcd.call(self.etcd.delete_sync, self.membership.key)
        except ShoalError as exc:
            log.warning("cannot withdraw from the membership: %s", exc)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.membership.lease_valid():
            async with self._reconcile_lock:
                await self._reconcile()
            left = self._stored_here()
            if not self.mine and not left:
                log.info("left the cluster: every partition handed over")
                return
            if not [n for n in self.membership.nodes if n != self.node_id]:
                break  # nobody to hand over to
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.1)
            except TimeoutError:
                pass
        log.warning("leaving with %d partition(s) still owned and %d message(s) on disk: they are handed over when "
                    "this node comes back", len(self.mine), self._stored_here())

    def load(self) -> dict[str, Any]:
        """What this node holds: per queue, the depth of each partition it owns, and of each it stores but does not
        own (messages on their way to the owner)."""
        owned: dict[str, dict[str, int]] = {}
        stored: dict[str, dict[str, int]] = {}
        for queue in self.manager.queues():
            for part in queue.partitions:
                if (queue.name, part.index) in self.mine:
                    owned.setdefault(queue.name, {})[str(part.index)] = part.depth
                elif part.depth:
                    stored.setdefault(queue.name, {})[str(part.index)] = part.depth
        return {"owned": owned, "stored_not_owned": stored}

    async def _report_load(self) -> None:
        now = time.monotonic()
        if now < self._next_load_report or not self.membership.lease_valid():
            return
        self._next_load_report = now + LOAD_INTERVAL
        load = self.load()
        if load == self._last_load and self._last_load_lease == self.membership.lease:
            return
        value = json.dumps({**load, "updated": int(time.time())}, sort_keys=True).encode()
        await self.etcd.call(self.etcd.put_sync, self.load_prefix + self.node_id.encode(), value,
                             self.membership.lease)
        self._last_load, self._last_load_lease = load, self.membership.lease

    def _stored_here(self) -> int:
        return sum(p.depth for q in self.manager.queues() for p in q.partitions)

    async def _claim(self, part: tuple[str, int]) -> bool:
        key = self.partitions_prefix + f"{part[0]}/{part[1]}".encode()
        lease = self.membership.lease
        value = json.dumps({"owner": self.node_id}).encode()
        revision, existing = await self.etcd.call(self.etcd.claim_sync, key, value, lease)
        if not revision:
            if existing is not None and existing.lease == lease:
                revision = existing.create_revision  # ours already (claimed before a lost answer)
            else:
                return False
        if self._stopping or lease != self.membership.lease:
            return False
        self.mine[part] = revision
        self._claimed_recently.add(part)
        self.owners[part] = Owner(self.node_id, revision, lease)
        self._ownership_changed()  # deliver from it at once
        self._retry_held()  # publishes that waited for this partition go first
        log.info("partition %s/%d owned here from epoch %d", part[0], part[1], revision)
        # Write the epoch into the readable value too (the key's create revision stays the authority).
        readable = json.dumps({"owner": self.node_id, "epoch": revision}).encode()
        await self.etcd.call(self.etcd.put_if_created_at_sync, key, readable, lease, revision)
        self._claimed_recently.discard(part)
        return True

    # -- queue definitions ------------------------------------------------------------------------------------

    def queue_config(self, name: str) -> QueueConfig | None:
        return self.definitions.get(name)

    def define(self, name: str, config: QueueConfig) -> asyncio.Future[QueueConfig]:
        """Record the queue in etcd unless it is there already; resolves to the settings every node uses."""
        future = self._defining.get(name)
        if future is None:
            future = self._defining[name] = asyncio.ensure_future(self._define(name, config))
            future.add_done_callback(lambda f: self._defining.pop(name, None))
        return future

    async def _define(self, name: str, config: QueueConfig) -> QueueConfig:
        key = self.queues_prefix + name.encode()
        value = json.dumps({**asdict(config), "created": int(time.time())}, sort_keys=True).encode()
        created, existing = await self.etcd.call(self.etcd.create_sync, key, value)
        if not created and existing is not None:
            values = json.loads(existing.value)
            values.pop("created", None)
            config = QueueConfig.from_mapping(values)
        elif created:
            log.info("queue %s defined in the cluster: %d partition(s)", name, config.partitions)
        self.definitions.setdefault(name, config)
        self._changed()
        return self.definitions[name]

    def _ensure_local(self, name: str) -> bool:
        """Open the queue here (False, logged once, if this node cannot serve it)."""
        try:
            self.manager.queue(name)
            return True
        except ShoalError as exc:
            if name not in self._unservable:
                self._unservable.add(name)
                log.error("queue %s cannot be served by this node: %s", name, exc)
            return False

    # -- forwarding -------------------------------------------------------------------------------------------

    def forward(self, queue: str, partition: int, records: list[bytes]) -> asyncio.Future[None]:
        """Send publishes (stored records), in order, to the partition's owner. The forwards of one loop turn to
        one partition share the returned future, which resolves once the owner has them on disk (one future per
        partition per turn: a refusal fails only the publishes of its partition)."""
        entry = self._turn.get((queue, partition))
        if entry is None:
            if not self._turn:
                self._loop.call_soon(self._flush_turn)
            entry = self._turn[(queue, partition)] = ([], self._loop.create_future())
        entry[0].extend(records)
        return entry[1]

    def _flush_turn(self) -> None:
        turn, self._turn = self._turn, {}
        blocked = {part for held in self._held for part in held.groups} if self._held else set()
        deadline = time.monotonic() + FORWARD_TIMEOUT
        for part, (records, future) in turn.items():
            self._unsettled[part] = self._unsettled.get(part, 0) + 1
            self._forward_seq += 1
            self._send(_Forward(self._forward_seq, {part: records}, future, deadline), blocked)

    def _send(self, forward: _Forward, blocked: set[tuple[str, int]]) -> None:
        """Send each group to its partition's owner (or append it here if this node owns it now); groups without
        a reachable owner wait for the next attempt.

        Per-partition order: a partition's groups on their way (sent, not yet answered) all ride in one gRPC
        message (the peer's batch of this loop turn), answered or failed together; a group waits while an
        earlier group of its partition is waiting (``blocked``) or on its way in an earlier message, and waiting
        groups are sent again oldest first. A group refused or lost is thus always sent again before any later
        one, and the groups that waited for it go with it."""
        held: dict[tuple[str, int], list[bytes]] = {}
        failure: ShoalError | None = None
        for part, records in forward.groups.items():
            on_the_way = self._on_the_way.get(part)
            if part in blocked:
                held[part] = records
                continue
            if part in self.mine and self.membership.lease_valid():
                if on_the_way is not None:
                    held[part] = records
                    blocked.add(part)
                    continue
                try:
                    part_log = self.manager.queue(part[0]).partition(part[1])
                    flush = None
                    for record in records:
                        flush = part_log.enqueue(record)
                except ShoalError as exc:
                    failure = exc
                    self._group_settled(part)
                    continue
                self._track(forward, flush, part, records)
                continue
            owner = self.owners.get(part)
            client = self._client(owner.node) if owner is not None and owner.node != self.node_id else None
            if owner is None or client is None or (on_the_way is not None and on_the_way is not client.open_batch):
                held[part] = records
                blocked.add(part)
                continue
            flush = client.enqueue_records(part[0], part[1], owner.epoch, records)
            self._on_the_way[part] = flush
            self._track(forward, flush, part, records, remote=True)
        forward.groups = held
        if failure is not None:
            self._fail(forward, failure)
        elif held:
            self._hold(forward)
        elif forward.outstanding == 0:
            self._settle(forward)

    def _track(self, forward: _Forward, flush: asyncio.Future[None] | None, part: tuple[str, int],
               records: list[bytes], remote: bool = False) -> None:
        forward.outstanding += 1

        def done(f: asyncio.Future[None] | None) -> None:
            forward.outstanding -= 1
            if remote and self._on_the_way.get(part) is f:
                del self._on_the_way[part]
                if self._held:
                    self._schedule_retry(0)  # the partition's next groups may go now
            error = f.exception() if f is not None else None
            retry = getattr(error, "retriable", False)
            if retry and not forward.future.done():
                log.debug("forward to %s/%d failed (%s); retrying", part[0], part[1], error)
                forward.groups[part] = records
                self._hold(forward)
                return
            self._group_settled(part)
            if forward.future.done():
                return
            if error is not None:
                self._fail(forward, error)
                return
            if forward.outstanding == 0 and not forward.groups:
                self._settle(forward)

        if flush is None:
            done(None)
        else:
            flush.add_done_callback(done)

    def _group_settled(self, part: tuple[str, int]) -> None:
        count = self._unsettled.get(part, 0) - 1
        if count > 0:
            self._unsettled[part] = count
        else:
            self._unsettled.pop(part, None)

    def _hold(self, forward: _Forward) -> None:
        if time.monotonic() >= forward.deadline:
            parts = ", ".join(f"{q}/{p}" for q, p in forward.groups)
            self._fail(forward, ShoalError(f"no owner of {parts} took the message within {FORWARD_TIMEOUT:.0f} s"))
            return
        if not forward.held:
            forward.held = True
            bisect.insort(self._held, forward, key=lambda f: f.seq)
        self._schedule_retry(FORWARD_RETRY)

    def _schedule_retry(self, delay: float) -> None:
        if self._retry_handle is not None:
            if delay > 0:
                return
            self._retry_handle.cancel()
        self._retry_handle = (self._loop.call_later(delay, self._retry_held) if delay > 0
                              else self._loop.call_soon(self._retry_held))

    def _retry_held(self) -> None:
        """Send again what waits, oldest first (so each partition keeps its order)."""
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        held, self._held = self._held, []
        blocked: set[tuple[str, int]] = set()
        for forward in held:
            forward.held = False
            if forward.future.done() or not forward.groups:
                continue
            try:
                self._send(forward, blocked)
            except Exception as exc:  # never lose a held forward to a bug: fail it, visibly
                log.exception("forwarding failed")
                self._fail(forward, exc)

    def _settle(self, forward: _Forward) -> None:
        if not forward.future.done():
            forward.future.set_result(None)

    def _fail(self, forward: _Forward, error: BaseException) -> None:
        for part in forward.groups:
            self._group_settled(part)
        forward.groups = {}
        if not forward.future.done():
            forward.future.set_exception(error)

    def _client(self, node: str) -> EnqueueClient | None:
        client = self._clients.get(node)
        info = self.membership.nodes.get(node)
        if info is None:
            return None  # not alive: its partitions move once its lease expires
        target = info.get("grpc")
        if client is not None and client.target == target:
            return client
        if client is not None:
            asyncio.ensure_future(client.close())
        if not target:
            return None
        client = self._clients[node] = EnqueueClient(target)
        return client
