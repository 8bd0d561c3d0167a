"""Partition ownership: who may write a partition, and the loop that keeps ownership in line with the assigner.

The invariant: **a node writes to a partition (appends, acks, delivers from it) only while it holds the
partition's key in etcd and its lease is certainly alive** (``Membership.lease_valid``). The key is created
create-if-absent on the owner's lease, only once it is absent: a previous owner deletes it after handing its
messages over (graceful), or its lease expires (crash). etcd grants a key to one lease at a time, and a node stops
trusting its lease before etcd can expire it (``Membership.valid_until``), so no two nodes ever write one
partition. The key's create revision is the partition's epoch; forwarded batches name it, and the owner refuses
any other (``check``).

Reconciling (at once on any change of nodes, queues or owners, and every ``RECONCILE_INTERVAL``): the
``PartitionAssigner`` says who should own each partition among the live nodes; this node

- **claims** a partition it should own once its key is absent;
- **hands over** (``PartitionMover``) a partition another live node should own;
- **drains** messages stored here for a partition another node owns to that owner.

**Leaving** (SIGTERM) deletes the node's registration first, so the others stop assigning it partitions, hands
everything over (bounded in time; what is left stays on disk for the next start), then revokes the lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from shoalmq.cluster import stats
from shoalmq.cluster.assignment import PartitionAssigner
from shoalmq.cluster.definitions import QueueDefinitions
from shoalmq.cluster.etcd import Etcd
from shoalmq.cluster.handoff import PartitionMover
from shoalmq.cluster.membership import Membership
from shoalmq.cluster.view import ClusterView, Owner, Partition
from shoalmq.errors import NotOwner, ShoalError, StaleEpoch

if TYPE_CHECKING:
    from shoalmq.queue.manager import QueueManager

log = logging.getLogger(__name__)

#: Seconds between reconciliations when nothing changes (a change triggers one at once).
RECONCILE_INTERVAL = 1.0


class Ownership:
    """This node's partitions (``view.mine``) and the reconcile loop (see the module docstring)."""

    def __init__(self, etcd: Etcd, membership: Membership, view: ClusterView, manager: QueueManager,
                 definitions: QueueDefinitions, assigner: PartitionAssigner) -> None:
        self.etcd = etcd
        self.membership = membership
        self.view = view
        self.manager = manager
        self.definitions = definitions
        self.assigner = assigner
        self.node_id = membership.node_id
        self.mover = PartitionMover(etcd, view, manager, self.release, self.keep)
        #: Called after this node's partitions change (dispatch sources, held forwards).
        self.on_change: list[Callable[[], None]] = []
        #: Coroutine functions run after each reconciliation (the load report).
        self.after_reconcile: list[Callable[[], Awaitable[None]]] = []
        #: Set by ``leave``: this node hands everything over and takes nothing.
        self.leaving = False
        self._stopping = False
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        #: Partitions claimed but whose key the watch may not have shown yet.
        self._claimed_recently: set[Partition] = set()

    # -- the answers ------------------------------------------------------------------------------------------

    def holds(self, part: Partition) -> bool:
        """This node may write the partition now (it holds the key, and its lease is certainly alive; or it leads
        the replicated partition: ``replication``, where the in-sync set fences, not the lease)."""
        return self.view.held(part, self.membership.lease_valid())

    def check(self, queue: str, partition: int, epoch: int) -> None:
        """For forwarded batches: NotOwner or StaleEpoch unless this node owns the partition at ``epoch``."""
        mine = self.view.mine.get((queue, partition))
        if mine is None or not self.view.held((queue, partition), self.membership.lease_valid()):
            raise NotOwner(f"node {self.node_id} does not own {queue}/{partition}")
        if mine != epoch:
            raise StaleEpoch(f"{queue}/{partition} is at epoch {mine} on {self.node_id}, not {epoch}")

    def owned_partitions(self, queue: str) -> list[int]:
        return sorted(p for (q, p) in self.view.mine if q == queue)

    # -- life -------------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Follow the lease and the owners (before anything else that reads ``view.mine`` on an owners change)."""
        self.membership.on_lease_lost.append(self._lease_lost)
        self.membership.on_lease_regained.append(self.wake)
        self.view.on_owners.append(self._owners_updated)

    def start(self) -> None:
        """Reconcile until ``stop``."""
        self._task = asyncio.create_task(self._run(), name="shoalmq-ownership")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._wake.set()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """Something changed (nodes, queues, owners, the lease): reconcile at once."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:  # (not only cancellation: wait_for can swallow a cancel on 3.11)
            try:
                await asyncio.wait_for(self._wake.wait(), RECONCILE_INTERVAL)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                async with self._lock:
                    await self._reconcile()
                for callback in self.after_reconcile:
                    await callback()
            except ShoalError as exc:
                log.warning("cannot reconcile partition ownership now: %s", exc)
            except Exception:  # a bug must not end the loop that keeps ownership right
                log.exception("reconciling partition ownership failed")

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    def _lease_lost(self) -> None:
        mine, records = self.view.mine, self.view.records
        leased = [p for p in mine if p not in records]
        if leased:
            log.error("lease lost: giving up %d partition(s) until registered again", len(leased))
            for part in leased:
                del mine[part]
            self._changed()

    def _owners_updated(self) -> None:
        # A key of ours that is gone (or now someone else's) is no longer ours, whatever we thought.
        owners, mine, records = self.view.owners, self.view.mine, self.view.records
        lost = [p for p, epoch in mine.items() if p not in records
                and ((o := owners.get(p)) is None or o.node != self.node_id or o.epoch != epoch)]
        gone = False
        for part in lost:
            if owners.get(part) is None and part in self._claimed_recently:
                continue  # our own claim, not yet seen by the watch
            del mine[part]
            gone = True
            now = owners.get(part)
            log.info("partition %s/%d is no longer owned here: %s", *part,
                     f"node {now.node} owns it now" if now is not None and now.node != self.node_id else
                     "its key is gone (handed over, or our lease ended)")
        if gone:
            self._changed()
        self.wake()

    def release(self, part: Partition) -> bool:
        """Stop writing to and delivering from a partition (a handoff starts); True if this node held it."""
        if self.view.mine.pop(part, None) is None:
            return False
        self._changed()
        return True

    def keep(self, part: Partition, epoch: int) -> None:
        """A handoff did not happen: own the partition again if its key is still ours at that epoch."""
        if part[0] not in self.view.definitions:
            return  # (its queue was deleted meanwhile)
        current = self.view.owners.get(part)
        if (current is not None and current.node == self.node_id and current.epoch == epoch
                and current.lease == self.membership.lease and self.membership.lease_valid()):
            self.view.mine[part] = epoch
            self._changed()

    def forget_queue(self, name: str) -> list[tuple[Partition, int]]:
        """The queue was deleted: stop writing its partitions at once. Returns the (partition, epoch) of the keys
        this node holds of it, for ``release_keys``."""
        mine, records = self.view.mine, self.view.records
        held = [(part, epoch) for part, epoch in mine.items() if part[0] == name and part not in records]
        for part, _ in held:
            del mine[part]
        for part, owner in self.view.owners.items():  # (keys of ours not written to: a handoff that did not end)
            if part[0] == name and owner.node == self.node_id and (part, owner.epoch) not in held \
                    and part not in records:
                held.append((part, owner.epoch))
        if held:
            self._changed()
        return held

    async def release_keys(self, keys: list[tuple[Partition, int]]) -> None:
        """Delete this node's ownership keys (each only if it is still the one created at that epoch)."""
        for part, epoch in keys:
            await self.etcd.call(self.etcd.delete_if_created_at_sync, self.view.partition_key(part), epoch)

    # -- reconciling ------------------------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        if self._stopping or not self.membership.lease_valid():
            return
        view = self.view
        nodes = view.nodes
        draining = self.membership.draining
        live = [n for n in self.membership.serving() if not ((self.leaving or draining) and n == self.node_id)]
        if not live or (self.node_id not in live and not self.leaving and not draining):
            return  # our own registration is not in the view yet, or nobody is left to take over
        changed = False
        handoffs: list[tuple[Partition, str, int]] = []
        for name, config in list(view.definitions.items()):
            if config.replication_factor > 1 or not self.definitions.servable(name):
                continue  # (replicated queues are ``replication``'s)
            for index, wanted in enumerate(self.assigner.assign(name, config.partitions, live)):
                if self._stopping or not self.membership.lease_valid():
                    return
                part = (name, index)
                current = view.owners.get(part)
                if part in view.mine:
                    if wanted != self.node_id and wanted in nodes:
                        handoffs.append((part, wanted, view.mine[part]))
                elif current is not None and current.node == self.node_id:
                    # A key of ours we do not write to: a handoff that did not finish, or a claim whose answer
                    # was lost. Take it up again, or finish handing it over.
                    if current.lease != self.membership.lease:
                        continue  # from an earlier lease: it expires on its own
                    if wanted == self.node_id:
                        view.mine[part] = current.epoch
                        self._changed()  # deliver from it at once, not after the drains of this pass
                    elif wanted in nodes:
                        handoffs.append((part, wanted, current.epoch))
                elif wanted == self.node_id:
                    if current is None and await self._claim(part):
                        changed = True
                elif current is not None and current.node in nodes:
                    await self.mover.drain(part, current)
        if handoffs:
            await self.mover.hand_off_all(handoffs)
        if changed:
            self._changed()

    async def _claim(self, part: Partition) -> bool:
        key = self.view.partition_key(part)
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
        self.view.mine[part] = revision
        self._claimed_recently.add(part)
        self.view.record_owner(part, Owner(self.node_id, revision, lease))
        stats.COUNTERS.leader_changes += 1
        self.manager.set_epoch(*part, revision)  # stored with the partition (its leader epoch, for replication)
        self._changed()  # deliver from it at once; publishes that waited for it go first
        former = self.view.former.pop(part, None)
        why = ("it had no owner" if former is None else f"handed over by node {former}"
               if former in self.membership.nodes else f"node {former} is gone (it left, or its lease expired)")
        log.info("partition %s/%d owned here from epoch %d: %s", part[0], part[1], revision, why)
        # Write the epoch into the readable value too (the key's create revision stays the authority).
        readable = json.dumps({"owner": self.node_id, "epoch": revision}).encode()
        await self.etcd.call(self.etcd.put_if_created_at_sync, key, readable, lease, revision)
        self._claimed_recently.discard(part)
        return True

    # -- leaving ----------------------------------------------------------------------------------------------

    async def leave(self, timeout: float = 30.0) -> None:
        """Leave gracefully: withdraw this node from the membership (others stop assigning it partitions) and hand
        every partition, and every message stored here, to the nodes that remain; at most ``timeout`` seconds
        (what is left stays on disk and is handed over when the node comes back)."""
        self.leaving = True
        deadline = time.monotonic() + timeout
        # etcd may be down for a moment (a restart): keep trying, or the node would leave with everything it
        # stores, for the others to find only when it comes back.
        while True:
            try:
                await self.membership.update(leaving=True)  # (so that the others log a leave, not a lost lease)
                await self.etcd.call(self.etcd.delete_sync, self.membership.key)
                break
            except ShoalError as exc:
                if time.monotonic() >= deadline:
                    log.warning("cannot withdraw from the membership: %s; leaving %d message(s) on disk, handed "
                                "over when this node comes back", exc, self._stored_here())
                    return
                log.info("cannot withdraw from the membership yet (%s); trying again", exc)
                await asyncio.sleep(0.5)
        self.membership.leaving = True
        while time.monotonic() < deadline:
            if not self.membership.lease_valid():
                # An etcd outage: the lease is likely alive still (an etcd restart renews every lease), and this
                # node may write again once a refresh says so. Until then, nothing is safe to hand over.
                await asyncio.sleep(0.1)
                continue
            async with self._lock:
                await self._reconcile()
            if not [p for p in self.view.mine if p not in self.view.records] and not self._stored_here():
                log.info("left the cluster: every partition handed over")
                return
            if not [n for n in self.view.nodes if n != self.node_id]:
                break  # nobody to hand over to
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.1)
            except TimeoutError:
                pass
        log.warning("leaving with %d partition(s) still owned and %d message(s) on disk: they are handed over when "
                    "this node comes back", len(self.view.mine), self._stored_here())

    def _stored_here(self) -> int:
        """Messages stored here of queues that are not replicated (replicas stay where they are)."""
        definitions = self.view.definitions
        return sum(sum(depths) for name, depths in self.manager.depths().items()
                   if (config := definitions.get(name)) is None or config.replication_factor < 2)
