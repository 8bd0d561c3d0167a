"""Queue definitions in etcd: the first node to see a queue records its settings; every node serves them.

``/<cluster>/queues/<name>`` is written once, create-if-absent, by whichever node first sees the queue (a publish,
a subscription, its ``queues:`` configuration, or its data directory). A node whose data directory or
configuration has another partition count for a queue the cluster knows cannot serve it (at start: it refuses to
start); other settings are taken from the cluster, with a warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from shoalmq.cluster.etcd import Etcd
from shoalmq.cluster.view import ClusterView, parse_definition
from shoalmq.errors import ConfigError, ShoalError
from shoalmq.queue.config import QueueConfig

if TYPE_CHECKING:
    from shoalmq.queue.manager import QueueManager

log = logging.getLogger(__name__)


class QueueDefinitions:
    """Defines queues in the cluster and checks this node's against it."""

    def __init__(self, etcd: Etcd, view: ClusterView, manager: QueueManager) -> None:
        self.etcd = etcd
        self.view = view
        self.manager = manager
        self._defining: dict[str, asyncio.Future[QueueConfig]] = {}
        self._unservable: set[str] = set()

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
        created, existing = await self.etcd.call(self.etcd.create_sync, key, value)
        if not created and existing is not None:
            config = parse_definition(existing.value)
        elif created:
            log.info("queue %s defined in the cluster: %d partition(s)", name, config.partitions)
        definitions = self.view.definitions
        definitions.setdefault(name, config)
        for callback in self.view.on_definitions:
            callback()
        return definitions[name]

    async def check_local_queues(self) -> None:
        """Queues this node stored before (created in an earlier run) or declares are defined in the cluster
        too; ConfigError for one the cluster knows with another partition count."""
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
