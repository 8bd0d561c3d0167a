"""In-memory stand-ins behind the interfaces the unit tests drive: consumers of the queue manager, the manager's
``Cluster``, a membership and a peer's ``EnqueueClient``, and the helpers that run the event loop until a condition
holds. The integration tests never use them (they start real brokers, etcd and MQTT clients)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shoalmq.queue.config import QueueConfig
from shoalmq.queue.manager import Delivery, QueueManager
from shoalmq.queue.storage import MemoryBackend, Store


class FakeConsumer:
    """Records what it is handed; acks only when told to."""

    def __init__(self, name: str, window: int = 32) -> None:
        self.name = name
        self.window = window
        self.received: list[Delivery] = []
        self._acked = 0  # received[:_acked] were acked
        self.max_held = 0
        self.manager: QueueManager | None = None

    def deliver(self, deliveries: list[Delivery]) -> None:
        self.received += deliveries
        if self.manager is not None:
            self.max_held = max(self.max_held, self.manager.inflight(self))

    def revoke(self, deliveries: list[Delivery]) -> None:
        self.revoked = getattr(self, "revoked", []) + deliveries

    def ack_all(self, manager: QueueManager) -> int:
        unacked, self._acked = self.received[self._acked:], len(self.received)
        return manager.ack(unacked)


class AckingConsumer(FakeConsumer):
    """Acks every delivery at once, as ``mosquitto_sub`` does."""

    def deliver(self, deliveries: list[Delivery]) -> None:
        super().deliver(deliveries)
        assert self.manager is not None
        asyncio.get_running_loop().call_soon(self.ack_all, self.manager)


class RemoteFakeConsumer(FakeConsumer):
    """Another node's route stream, as the manager sees it."""

    remote = True


async def settle(until: Callable[[], bool] | None = None, timeout: float = 5.0) -> None:
    """Let commits and dispatches run until ``until()`` holds (or a few loop turns if none is given)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in range(20):
        await asyncio.sleep(0)
    while until is not None and not until():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def manager_on(backend: MemoryBackend, **kwargs: Any) -> QueueManager:
    return QueueManager(Store(backend), **kwargs)


class FakeCluster:
    """The ``Cluster`` interface over dicts: which partitions are ours, what was forwarded, defined queues."""

    def __init__(self, owned: dict[str, list[int]] | None = None) -> None:
        self.owned = owned or {}
        self.definitions: dict[str, QueueConfig] = {}
        self.forwarded: list[tuple[str, int, bytes]] = []
        self.defining: dict[str, asyncio.Future[QueueConfig]] = {}
        self.extra: dict[str, list[Any]] = {}

    def queue_config(self, name: str) -> QueueConfig | None:
        return self.definitions.get(name)

    def define(self, name: str, config: QueueConfig) -> asyncio.Future[QueueConfig]:
        future = self.defining[name] = asyncio.get_running_loop().create_future()
        self._config = config
        return future

    def finish_definition(self, name: str) -> None:
        self.definitions[name] = self._config
        self.defining[name].set_result(self._config)

    def writable(self, queue: str, partition: int) -> bool:
        return partition in self.owned.get(queue, [])

    def forward(self, queue: str, partition: int, records: list[bytes]) -> asyncio.Future[None]:
        self.forwarded += [(queue, partition, record) for record in records]
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def owned_partitions(self, queue: str) -> list[int]:
        return self.owned.get(queue, [])

    def proxies(self, queue: str) -> list[Any]:
        return self.extra.get(queue, [])


def clustered(cluster: FakeCluster, partitions: int = 4) -> QueueManager:
    manager = QueueManager(Store(MemoryBackend()), defaults=QueueConfig(partitions=partitions))
    manager.cluster = cluster
    return manager


class FakeMembership:
    def __init__(self) -> None:
        self.node_id, self.cluster, self.lease = "a", "c", 1
        self.nodes = {"a": {"grpc": "a:1"}, "b": {"grpc": "b:1"}}
        self.on_change: list[Any] = []
        self.on_lease_lost: list[Any] = []
        self.on_lease_regained: list[Any] = []

    draining = False

    def serving(self) -> list[str]:
        return sorted(self.nodes)

    def lease_valid(self) -> bool:
        return True


class FakeClient:
    """A peer's EnqueueClient: each call returns a future the test resolves."""

    target = "b:1"
    open_batch = None
    available = True

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], asyncio.Future[None]]] = []

    def enqueue_records(self, queue: str, partition: int, epoch: int, records: list[bytes]) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self.calls.append((list(records), future))
        return future
