"""Forwarding: publishes to a partition another node owns go to that owner, in batches, and are acknowledged only
once the owner has them on disk.

A publish to a partition this node owns is appended locally (by the queue manager). Any other joins this loop
turn's group for its partition (one future per partition per turn); the groups for one peer travel in one
``EnqueueRemote`` stream message, each partition's records packed in one field, and the publishers' PUBACKs wait
for the owner's answer. A group that the owner refuses as not-owner or stale-epoch (``retriable`` errors), or that
is lost with a dying peer, is sent again to whoever owns the partition then (the view is refreshed by the watch),
for up to ``FORWARD_TIMEOUT`` seconds; a partition with no owner at the moment (between a crash and the takeover)
holds its publishes meanwhile.

Per-partition order is kept across retries: a partition has at most one gRPC message with groups on its way,
held groups are retried oldest first, and a local publish to a partition waits behind forwarded ones not yet
settled (``unsettled``).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shoalmq.cluster.membership import Membership
from shoalmq.cluster.transport import EnqueueClient, ForwardError, Status
from shoalmq.cluster.view import ClusterView, Partition
from shoalmq.errors import ShoalError

if TYPE_CHECKING:
    from shoalmq.queue.manager import QueueManager

log = logging.getLogger(__name__)

#: Seconds a forwarded publish may wait for an owner that takes it before the publish fails.
FORWARD_TIMEOUT = 30.0
#: Seconds between attempts to send forwarded publishes that found no owner, or were refused as not-owner.
FORWARD_RETRY = 0.05


class _Forward:
    """Forwarded publishes of one loop turn to one partition, and the future their publishers wait on."""

    __slots__ = ("deadline", "future", "groups", "held", "outstanding", "seq")

    def __init__(self, seq: int, groups: dict[Partition, list[bytes]], future: asyncio.Future[None],
                 deadline: float) -> None:
        self.seq = seq  # turn order: held forwards are retried oldest first
        self.groups = groups
        self.future = future
        self.deadline = deadline
        self.outstanding = 0
        self.held = False


class Forwarder:
    """This node's forwarded publishes (see the module docstring)."""

    def __init__(self, view: ClusterView, membership: Membership, manager: QueueManager,
                 holds: Callable[[Partition], bool]) -> None:
        self.view = view
        #: May this node append to the partition itself (``Ownership.holds``)?
        self.holds = holds
        self.membership = membership
        self.manager = manager
        self._clients: dict[str, EnqueueClient] = {}
        self._loop = asyncio.get_running_loop()
        self._turn: dict[Partition, tuple[list[bytes], asyncio.Future[None]]] = {}
        self._held: list[_Forward] = []
        #: Partitions with forwarded groups not yet stored (a local publish to them waits behind those).
        self._unsettled: dict[Partition, int] = {}
        #: Partitions with groups sent to another node and not yet answered -> the future of the gRPC message
        #: they ride in (all of a partition's groups on their way share one).
        self._on_the_way: dict[Partition, asyncio.Future[None]] = {}
        self._forward_seq = 0
        self._retry_handle: asyncio.Handle | None = None
        #: Partition -> groups sent and not yet answered: their answer -> (owner node, epoch, the batch's future).
        self._sent: dict[Partition, dict[asyncio.Future[None], tuple[str, int, asyncio.Future[None]]]] = {}

    def unsettled(self, part: Partition) -> bool:
        """Forwarded publishes to the partition are not stored yet (a local publish must wait behind them)."""
        return part in self._unsettled

    def nodes_changed(self, nodes: dict) -> None:
        for node in [n for n in self._clients if n not in nodes]:
            asyncio.ensure_future(self._clients.pop(node).close())

    async def stop(self) -> None:
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

    def _send(self, forward: _Forward, blocked: set[Partition]) -> None:
        """Send each group to its partition's owner (or append it here if this node owns it now); groups without
        a reachable owner wait for the next attempt.

        Per-partition order: a partition's groups on their way (sent, not yet answered) all ride in one gRPC
        message (the peer's batch of this loop turn), answered or failed together; a group waits while an
        earlier group of its partition is waiting (``blocked``) or on its way in an earlier message, and waiting
        groups are sent again oldest first. A group refused or lost is thus always sent again before any later
        one, and the groups that waited for it go with it."""
        held: dict[Partition, list[bytes]] = {}
        failure: ShoalError | None = None
        for part, records in forward.groups.items():
            on_the_way = self._on_the_way.get(part)
            if part in blocked:
                held[part] = records
                continue
            if self.holds(part):
                if on_the_way is not None:
                    held[part] = records
                    blocked.add(part)
                    continue
                try:
                    flush = self.manager.append(part[0], part[1], records)
                except ShoalError as exc:
                    failure = exc
                    self._group_settled(part)
                    continue
                self._track(forward, flush, part, records)
                continue
            owner = self.view.owners.get(part)
            client = self._client(owner.node) if owner is not None and owner.node != self.view.node_id else None
            if (owner is None or client is None or not client.available
                    or (on_the_way is not None and on_the_way is not client.open_batch)):
                held[part] = records
                blocked.add(part)
                continue
            flush = client.enqueue_records(part[0], part[1], owner.epoch, records)
            self._on_the_way[part] = flush
            self._track(forward, self._answer(part, owner.node, owner.epoch, flush), part, records, remote=flush)
        forward.groups = held
        if failure is not None:
            self._fail(forward, failure)
        elif held:
            self._hold(forward)
        elif forward.outstanding == 0:
            self._settle(forward)

    def _answer(self, part: Partition, node: str, epoch: int, flush: asyncio.Future[None]) -> asyncio.Future[None]:
        """The owner's answer to one group sent at ``epoch``: ``flush``'s outcome, or a retriable failure as soon as
        the view shows the partition at a newer epoch (``owners_changed``): an owner cut off from the cluster
        answers nothing until its stream breaks, and a replicated partition's deposed leader can commit nothing."""
        answer = self._loop.create_future()
        sent = self._sent.setdefault(part, {})
        sent[answer] = (node, epoch, flush)

        def copy(f: asyncio.Future[None]) -> None:
            waiting = self._sent.get(part)
            if waiting is not None and waiting.pop(answer, None) is not None and not waiting:
                del self._sent[part]
            if not answer.done():
                if f.exception() is not None:
                    answer.set_exception(f.exception())  # type: ignore[arg-type]
                else:
                    answer.set_result(None)
        flush.add_done_callback(copy)
        return answer

    def owners_changed(self) -> None:
        """The owners changed: groups on their way to an owner superseded since are sent again to the new one
        (at least once: the old one may have stored them), then whatever waits is retried."""
        owners = self.view.owners
        for part, sent in list(self._sent.items()):
            current = owners.get(part)
            if current is None:
                continue
            for answer, (node, epoch, flush) in list(sent.items()):
                if current.epoch > epoch:
                    del sent[answer]
                    if self._on_the_way.get(part) is flush:
                        del self._on_the_way[part]
                    if not answer.done():
                        answer.set_exception(ForwardError(
                            f"{part[0]}/{part[1]} moved from {node} (epoch {epoch}) to {current.node} (epoch "
                            f"{current.epoch}) before {node} answered", Status.STALE_EPOCH))
            if not sent:
                del self._sent[part]
        # After the failed answers' callbacks (queued first) have held their groups again: they go oldest first.
        self._loop.call_soon(self.retry_held)

    def _track(self, forward: _Forward, flush: asyncio.Future[None] | None, part: Partition,
               records: list[bytes], remote: asyncio.Future[None] | None = None) -> None:
        forward.outstanding += 1

        def done(f: asyncio.Future[None] | None) -> None:
            forward.outstanding -= 1
            error = f.exception() if f is not None else None
            retry = getattr(error, "retriable", False)
            if remote is not None and self._on_the_way.get(part) is remote:
                del self._on_the_way[part]
                if self._held and not retry:
                    # The partition's next groups may go now. (Not after a failure: those wait FORWARD_RETRY, or a
                    # peer that refuses connections is retried at every loop turn: 466,817 retries in 60 s.)
                    self._schedule_retry(0)
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

    def _group_settled(self, part: Partition) -> None:
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
        self._retry_handle = (self._loop.call_later(delay, self.retry_held) if delay > 0
                              else self._loop.call_soon(self.retry_held))

    def retry_held(self) -> None:
        """Send again what waits, oldest first (so each partition keeps its order)."""
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        held, self._held = self._held, []
        blocked: set[Partition] = set()
        for forward in held:
            forward.held = False
            if forward.future.done() or not forward.groups:
                continue
            try:
                self._send(forward, blocked)
            except Exception as exc:  # never lose a held forward to a bug: fail it, visibly
                log.exception("forwarding failed")
                self._fail(forward, exc)

    def fail_queue(self, name: str, error: BaseException) -> None:
        """The queue was deleted: its held publishes fail now (not after FORWARD_TIMEOUT)."""
        failed = [f for f in self._held if any(part[0] == name for part in f.groups)]
        if failed:
            self._held = [f for f in self._held if f not in failed]
            for forward in failed:
                forward.held = False
                self._fail(forward, error)

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
        info = self.view.nodes.get(node)
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
