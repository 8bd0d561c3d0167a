"""A node's part in the cluster, assembled: the view, queue definitions, ownership (with handoffs), forwarding,
proxy routing and the load report, and the two interfaces the queue manager sees (``Cluster`` and
``Ownership`` in ``shoalmq.queue.manager``).

Each part lives in its own module: ``view`` (what this node knows), ``definitions`` (queues in etcd),
``ownership`` (who may write a partition; the reconcile loop), ``replication`` (replicated partitions: leaders,
followers, commit, failover), ``handoff`` (moving messages between nodes),
``forwarding`` (publishes to partitions owned elsewhere), ``routing`` (consumers on any node), ``load``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from shoalmq.cluster.assignment import PartitionAssigner
from shoalmq.cluster.definitions import QueueDefinitions
from shoalmq.cluster.etcd import Etcd
from shoalmq.cluster.forwarding import Forwarder
from shoalmq.cluster.load import LoadReport
from shoalmq.cluster.membership import Membership
from shoalmq.cluster.ownership import Ownership
from shoalmq.cluster.replication import Replicator
from shoalmq.cluster.routing import Router
from shoalmq.cluster.view import ClusterView
from shoalmq.errors import QueueError, ShoalError
from shoalmq.queue.config import QueueConfig

if TYPE_CHECKING:
    from shoalmq.queue.manager import QueueManager

log = logging.getLogger(__name__)


class Coordinator:
    """The cluster side of one node (see the module docstring)."""

    def __init__(self, etcd: Etcd, membership: Membership, manager: QueueManager, assigner: PartitionAssigner,
                 routing: str = "proxy") -> None:
        self.membership = membership
        self.manager = manager
        self.node_id = membership.node_id
        self.view = ClusterView(etcd, membership)
        self.definitions = QueueDefinitions(etcd, self.view, manager)
        self.ownership = Ownership(etcd, membership, self.view, manager, self.definitions, assigner)
        self.replicator = Replicator(etcd, membership, self.view, manager, self.definitions, assigner)
        self.forwarder = Forwarder(self.view, membership, manager, self.ownership.holds)
        self.load = LoadReport(etcd, membership, self.view, manager)
        #: Proxy routing's consumer side (None in direct mode).
        self.router: Router | None = Router(manager, self.view) if routing == "proxy" else None
        self.started = False
        self._confirming: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load the views, check this node's queues against the cluster's, then reconcile until ``stop``."""
        view, ownership = self.view, self.ownership
        self.membership.on_change.append(self._nodes_changed)
        view.on_definitions.append(ownership.wake)
        view.on_deleted.append(self._queue_deleted)
        view.on_definitions.append(self.definitions.record_revisions)
        self.manager.on_queue_opened = self.definitions.record_revisions
        ownership.on_change += [self.manager.refresh_sources, self.forwarder.retry_held]
        self.replicator.on_change += [self.manager.refresh_sources, self.forwarder.retry_held]
        ownership.after_reconcile.append(self.load.report)
        if self.router is not None:
            self.manager.on_consumers_changed = self.router.consumers_changed
        ownership.attach()  # (first on the owners' callbacks: lost partitions go before anything reads them)
        self.replicator.attach()
        if self.router is not None:
            view.on_owners.append(self.router.prune)
        view.on_owners.append(self.forwarder.owners_changed)
        await view.start()
        await self.definitions.check_local_queues()
        self.manager.refresh_sources()  # nothing is owned yet: deliver nothing until claimed
        ownership.start()
        self.replicator.start()
        self.started = True

    async def stop(self) -> None:
        await self.ownership.stop()
        await self.replicator.stop()
        self.view.stop()
        await self.forwarder.stop()
        if self.router is not None:
            await self.router.close()

    async def leave(self, timeout: float = 30.0) -> None:
        await self.replicator.leave()
        await self.ownership.leave(timeout)
        try:
            await asyncio.wait_for(self.load.final(), 2.0)
        except (ShoalError, asyncio.TimeoutError) as exc:
            log.warning("the last load report was not written (broker cluster status may show an older one): %s",
                        exc or "etcd did not answer within 2 s")

    def _queue_deleted(self, name: str) -> None:
        """The queue's definition is gone from etcd: another node (or this one) is deleting it. Stop leading,
        following and writing it, drop what this node stores of it, then confirm in etcd (``definitions``)."""
        # (a follower's copies are not counted: their leader counts those messages)
        followed = {index for queue, index in self.replicator.followers if queue == name}
        self.replicator.forget_queue(name)
        keys = self.ownership.forget_queue(name)
        removed = sum(n for index, n in self.manager.drop(name).items() if index not in followed)
        self.forwarder.fail_queue(name, QueueError(f"queue {name!r} was deleted"))
        self.manager.refresh_sources()
        log.info("queue %s deleted in the cluster: %d message(s) removed from this node", name, removed)
        task = asyncio.ensure_future(self._confirm_deleted(name, removed, keys))
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    async def _confirm_deleted(self, name: str, removed: int, keys: list[tuple[Any, int]]) -> None:
        try:
            await self.manager.store.flush()
            await self.ownership.release_keys(keys)
            await self.definitions.confirm_dropped(name, removed)
        except ShoalError as exc:
            log.warning("queue %s: cannot confirm its deletion in etcd now (%s); the deleting node goes on "
                        "without this node's word", name, exc)

    def _nodes_changed(self, nodes: dict[str, dict[str, Any]]) -> None:
        self.forwarder.nodes_changed(nodes)
        if self.router is not None:
            self.router.sync_peers()
        self.ownership.wake()
        if self.started:
            self.replicator.reconcile()

    # -- the queue manager's Cluster interface ------------------------------------------------------------------

    def queue_config(self, name: str) -> QueueConfig | None:
        return self.definitions.queue_config(name)

    def define(self, name: str, config: QueueConfig) -> asyncio.Future[QueueConfig]:
        return self.definitions.define(name, config)

    def writable(self, queue: str, partition: int) -> bool:
        """May a publish be appended to the partition here, now? (This node holds it, and no earlier publish to
        it is still being forwarded.)"""
        part = (queue, partition)
        return self.ownership.holds(part) and not self.forwarder.unsettled(part)

    def forward(self, queue: str, partition: int, records: list[bytes]) -> asyncio.Future[None]:
        return self.forwarder.forward(queue, partition, records)

    def owned_partitions(self, queue: str) -> list[int]:
        """The partitions dispatched from here (held, and not being drained for a leadership move)."""
        owned = self.ownership.owned_partitions(queue)
        draining = self.replicator.draining
        return [p for p in owned if (queue, p) not in draining] if draining else owned

    def proxies(self, queue: str) -> list[Any]:
        return self.router.sources(queue) if self.router is not None else []

    # -- and its Ownership interface (forwarded batches) --------------------------------------------------------

    def check(self, queue: str, partition: int, epoch: int) -> None:
        if self.replicator.replicated(queue):
            self.replicator.check(queue, partition, epoch)
        else:
            self.ownership.check(queue, partition, epoch)
