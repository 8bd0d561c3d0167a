"""Moving a partition's messages between nodes: handoffs to a partition's next owner, and messages left here.

A **handoff** (the assigner gives a partition this node owns to another live node: a join, a node back after a
crash, this node leaving): the new owner's gRPC server is probed first, and nothing is paused or taken back
until it answers (a node whose old registration is still in etcd after a crash, or one still starting, costs
only the probe, then a backoff per registration). Then this node stops writing to the partitions it hands to
that node and dispatching from them (publishes meanwhile are held by the forwarder), gives the consumers
``HANDOFF_ACK_GRACE`` to ack what they hold, takes the rest back (uncounted: they are delivered again by the new
owner), streams the messages with ``TransferPartition`` in chunks (each deleted here once the new owner has it on
disk), and deletes the partition's key (a transaction on its create revision), so that the new owner claims it.
A transfer that fails leaves the partition here, owned again.

A **drain** moves messages stored here for a partition another node owns (after a crash, or a handoff received
for a partition that went elsewhere) to its owner with ``EnqueueRemote``, checked against the owner's epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shoalmq.cluster.etcd import Etcd
from shoalmq.cluster.transport import EnqueueClient, peer_ready
from shoalmq.cluster.view import ClusterView, Owner, Partition
from shoalmq.errors import ShoalError

if TYPE_CHECKING:
    from shoalmq.queue.manager import QueueManager

log = logging.getLogger(__name__)

#: Messages per chunk when a partition's messages move to another node.
MOVE_CHUNK = 500
#: Seconds a chunk may wait for the other node's answer.
MOVE_TIMEOUT = 30.0
#: Seconds a handoff waits for the new owner's gRPC server to accept a connection before it gives up for now.
HANDOFF_PROBE_TIMEOUT = 1.0
#: Seconds a handoff lets consumers ack the partition's deliveries they hold before taking the rest back (a
#: delivery taken back is delivered again by the new owner, and its late ack counts for nothing).
HANDOFF_ACK_GRACE = 1.0
#: Backoff between handoff attempts to a node that failed one: doubling from the first to the last.
HANDOFF_BACKOFF = (0.25, 5.0)


class PartitionMover:
    """Handoffs and drains of this node's partitions (see the module docstring).

    ``release(part)`` stops this node writing to and dispatching from a partition (True if it held it);
    ``keep(part, epoch)`` takes it up again after a handoff that did not happen."""

    def __init__(self, etcd: Etcd, view: ClusterView, manager: QueueManager, release: Callable[[Partition], bool],
                 keep: Callable[[Partition, int], None]) -> None:
        self.etcd = etcd
        self.view = view
        self.manager = manager
        self._release = release
        self._keep = keep
        #: (node, its registration's start time) -> (no handoff to it before this time, the current backoff).
        self._backoff: dict[tuple[str, Any], tuple[float, float]] = {}

    async def hand_off_all(self, handoffs: list[tuple[Partition, str, int]]) -> None:
        """Hand partitions over, those to one node together: its readiness is probed once, and its partitions
        wait out one ack grace together (a node leaving with many partitions pauses each for one grace, not the
        sum of them)."""
        by_target: dict[str, list[tuple[Partition, int]]] = {}
        for part, target, epoch in handoffs:
            by_target.setdefault(target, []).append((part, epoch))
        results = await asyncio.gather(*(self._hand_off_to(target, parts) for target, parts in by_target.items()),
                                       return_exceptions=True)
        for error in results:  # (each handoff settles its partitions itself; none may end the others)
            if isinstance(error, BaseException):
                log.error("a handoff failed", exc_info=error)

    async def _hand_off_to(self, target: str, parts: list[tuple[Partition, int]]) -> None:
        info = self.view.nodes.get(target)
        if info is None or not info.get("grpc"):
            return
        backoff_key = (target, info.get("started"))
        not_before, delay = self._backoff.get(backoff_key, (0.0, 0.0))
        if time.monotonic() < not_before:
            return
        if not await peer_ready(info["grpc"], HANDOFF_PROBE_TIMEOUT):
            delay = min(max(delay * 2, HANDOFF_BACKOFF[0]), HANDOFF_BACKOFF[1])
            self._backoff[backoff_key] = (time.monotonic() + delay, delay)
            log.info("not handing %d partition(s) over to %s yet: its gRPC server at %s does not answer (next try "
                     "in %.2f s)", len(parts), target, info["grpc"], delay)
            return
        for part, _ in parts:
            self._release(part)
        deadline = time.monotonic() + HANDOFF_ACK_GRACE
        while time.monotonic() < deadline and any(self.manager.held(*part) for part, _ in parts):
            await asyncio.sleep(0.02)
        # All at once (each pauses its publishes until it is moved: one after the other, the last would wait for
        # every earlier transfer).
        done = await asyncio.gather(*(self._hand_off(part, target, epoch) for part, epoch in parts))
        if all(done):
            self._backoff.pop(backoff_key, None)
        else:  # a target that takes the probe but refuses or fails transfers is tried less and less often
            delay = min(max(delay * 2, HANDOFF_BACKOFF[0]), HANDOFF_BACKOFF[1])
            self._backoff[backoff_key] = (time.monotonic() + delay, delay)

    async def _hand_off(self, part: Partition, target: str, epoch: int) -> bool:
        """Move the released partition's messages to ``target``, then give up its key. False if the transfer
        failed (the partition is this node's again)."""
        taken_back = self.manager.take_back(*part)
        log.info("handing partition %s/%d over to %s (%d delivery(ies) in flight taken back)", part[0], part[1],
                 target, taken_back)
        started = time.monotonic()
        try:
            await self.manager.flush()
            moved = await self.move(part, target, epoch, transfer=True)
        except (ShoalError, OSError) as exc:
            log.warning("handoff of %s/%d to %s failed (%s); keeping it for now", part[0], part[1], target, exc)
            self._keep(part, epoch)
            return False
        try:
            deleted = await self.etcd.call(self.etcd.delete_if_created_at_sync, self.view.partition_key(part), epoch)
        except ShoalError as exc:
            # Moved, but the key is still ours: the partition stays released, and the next reconcile, finding a key
            # of ours it does not write to, finishes the handoff (nothing is left to move).
            log.warning("partition %s/%d moved to %s, but its key could not be given up yet: %s", part[0], part[1],
                        target, exc)
            return True
        if deleted:
            current = self.view.owners.get(part)
            if current is not None and current.epoch == epoch:
                del self.view.owners[part]  # before the watch says so: no second handoff of it
        log.info("partition %s/%d handed over to %s: %d message(s) moved in %.0f ms", part[0], part[1], target,
                 moved, (time.monotonic() - started) * 1000)
        return True

    async def drain(self, part: Partition, owner: Owner) -> None:
        """Move messages stored here for a partition another node owns to that owner (``EnqueueRemote``)."""
        if not self.manager.ready(*part):
            return
        try:
            moved = await self.move(part, owner.node, owner.epoch, transfer=False)
        except (ShoalError, OSError) as exc:
            # (Retriable: the view lagged a change of owner, or the owner is restarting; the next reconcile retries.)
            log.log(logging.INFO if getattr(exc, "retriable", False) else logging.WARNING,
                    "cannot move messages of %s/%d to its owner %s yet: %s", part[0], part[1], owner.node, exc)
            return
        if moved:
            log.info("moved %d message(s) of %s/%d left here to its owner %s", moved, part[0], part[1], owner.node)

    async def move(self, part: Partition, target: str, epoch: int, transfer: bool) -> int:
        """Send the partition's ready messages to ``target``, chunk by chunk; each chunk is deleted here once the
        target has it on disk. A chunk that fails is ready here again (it may have been stored there too: at
        least once)."""
        info = self.view.nodes.get(target)
        if info is None or not info.get("grpc"):
            raise ShoalError(f"node {target} is not alive")
        client = EnqueueClient(info["grpc"], transfer=transfer)
        moved = 0
        try:
            while True:
                messages = self.manager.export(*part, MOVE_CHUNK)
                if not messages:
                    if transfer:  # the end: the new owner's offsets continue after this node's
                        last = client.transfer_chunk(part[0], part[1], epoch, [], [], b"",
                                                     self.manager.next_offset(*part))
                        await asyncio.wait_for(last, MOVE_TIMEOUT)
                    return moved
                offsets = [m.offset for m in messages]
                records = [m.payload for m in messages]
                if transfer:
                    # The new owner keeps offsets, delivery counts (those before this export's take) and the
                    # high-water mark: a moved message is the same message, not a new one.
                    sent = client.transfer_chunk(part[0], part[1], epoch, records, offsets,
                                                 bytes(min(max(m.deliveries - 1, 0), 254) for m in messages), 0)
                else:  # a drain: the owner appends them after its own
                    sent = client.enqueue_records(part[0], part[1], epoch, records)
                try:
                    await asyncio.wait_for(sent, MOVE_TIMEOUT)
                except BaseException:
                    self.manager.exported(*part, offsets, moved=False)
                    raise
                self.manager.exported(*part, offsets, moved=True)
                moved += len(messages)
        finally:
            await client.close()
            if moved:
                await self.manager.flush()
