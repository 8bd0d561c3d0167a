"""One broker node: wires the data directory, the MQTT front end and (later) the queue manager and cluster."""

from __future__ import annotations

import asyncio
import logging
import signal

from shoalmq import __version__
from shoalmq.broker import MqttFrontEnd
from shoalmq.config import Config
from shoalmq.datadir import DataDir

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
        with DataDir.open(self.config.data_dir) as data_dir:
            front_end = MqttFrontEnd(self.config)
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
        log.info("stopped")
