"""One broker node: wires the data directory, the MQTT front end and (later) the queue manager and cluster."""

from __future__ import annotations

import asyncio
import logging
import signal

from shoalmq import __version__
from shoalmq.broker import MqttFrontEnd
from shoalmq.config import Config
from shoalmq.datadir import DataDir
from shoalmq.queue.manager import QueueManager
from shoalmq.queue.storage import open_lmdb_store

log = logging.getLogger(__name__)


class Node:
    """A running broker node. ``serve()`` runs it until SIGTERM or SIGINT, then shuts down in order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        config = self.config
        with DataDir.open(config.data_dir) as data_dir:
            store = open_lmdb_store(data_dir.path, sync=config.sync, batch_size=config.batch_size,
                                    flush_interval=config.flush_interval_ms / 1000,
                                    ring_capacity=config.ring_capacity)
            log.info("partition log: %d partition(s), %d message(s) recovered in %.0f ms (sync: %s)",
                     len(store.known_partitions()), store.recovered_messages, store.recovery_seconds * 1000,
                     config.sync)
            queues: QueueManager | None = None
            try:
                queues = QueueManager(store, config.queues, config.queue_defaults, config.consumer_window)
                for name, info in queues.describe().items():
                    log.info("queue %s: %d partition(s), %d message(s)", name, info["partitions"], info["depth"])
                front_end = MqttFrontEnd(config, queues)
                await front_end.start()
                log.info(
                    "ShoalMQ %s ready: mqtt://%s, data %s, embedded (single node), event loop %s",
                    __version__, front_end.address, data_dir.path, type(loop).__module__.split(".")[0],
                )
                try:
                    await self._stop.wait()
                finally:
                    log.info("shutting down")
                    await front_end.stop()
            finally:
                if queues is not None:
                    queues.close()
                await store.close()
        log.info("stopped")
