"""The MQTT listener and the amqtt broker behind it.

ShoalMQ owns the listening socket and hands each accepted connection to amqtt through amqtt's "external"
listener type. Binding ourselves gives a clear error when the address is taken (amqtt would log a traceback),
tells us the address really bound, and is where a later fast path takes over ``$queue/`` traffic.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from amqtt.adapters import StreamWriterAdapter

from shoalmq import stats
from shoalmq.broker.fastpath import QueueFastProtocol
from shoalmq.broker.frames import FrameGuardReader, MalformedPacket, refusal
from shoalmq.broker.sessions import Limits
from shoalmq.broker.queue_broker import ShoalBroker
from shoalmq.broker.security import Security, load_certificates, server_context
from shoalmq.config import Config, HostPort
from shoalmq.errors import ShoalError, StartupError, os_error_text
from shoalmq.queue.manager import QueueManager

log = logging.getLogger(__name__)

LISTENER = "default"

# amqtt's default plugin set adds an event logger and a packet logger (two tasks per packet even when not
# logging: 30-40% of its throughput) and a $SYS publisher. We keep only what a broker needs: anonymous access.
AMQTT_PLUGINS: dict[str, Any] = {
    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
}

SHUTDOWN_DEADLINE = 10.0


def amqtt_config(config: Config) -> dict[str, Any]:
    """The amqtt broker configuration for a ShoalMQ ``Config``."""
    return {
        "listeners": {LISTENER: {"type": "external"}},
        "plugins": dict(AMQTT_PLUGINS),
    }


class QuietClosedConnections(logging.Filter):
    """amqtt logs a connection that closes before sending anything (a TCP health check, a port probe) as an
    ERROR ("No data from ...") and then a WARNING ("Failed to initialize client session: No data ..."). This
    filter on amqtt's broker logger says it once, at INFO, in ShoalMQ's words."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("No data from "):
            client = message[len("No data from "):].split(" : ")[0]  # amqtt's "(client @=host:port)"
            if client.startswith("(client @=") and client.endswith(")"):
                client = client[len("(client @="):-1]
            record.msg, record.args = f"connection from {client} closed before sending CONNECT", None
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger("shoalmq").isEnabledFor(logging.INFO)
        if message.startswith("Failed to initialize client session: client ") and message.endswith(" refused"):
            return False  # (ShoalMQ logged why, once)
        return not message.startswith("Failed to initialize client session: No data")


_QUIET_CLOSED = QuietClosedConnections()


class MqttFrontEnd:
    """Listens for MQTT over TCP and serves each connection with amqtt (``ShoalBroker``, which adds ``$queue/``)."""

    def __init__(self, config: Config, queues: QueueManager) -> None:
        self._config = config
        self._queues = queues
        self._broker: ShoalBroker | None = None
        self._servers: list[asyncio.Server] = []
        self._tls_server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.security = Security(config.password_file, config.acl_file, config.allow_anonymous,
                                 certificate_identity=config.use_identity_as_username)
        #: The TLS listener's context (reloaded in place on SIGHUP).
        self.tls: ssl.SSLContext | None = None
        if config.tls_listen is not None:
            assert config.certfile is not None and config.keyfile is not None
            self.tls = server_context(config.certfile, config.keyfile, config.cafile, config.require_certificate)

    @property
    def broker(self) -> ShoalBroker | None:
        return self._broker

    @property
    def addresses(self) -> list[str]:
        """The URLs actually listened on (mqtt://, mqtts://)."""
        urls = []
        for server in self._servers:
            host, port = server.sockets[0].getsockname()[:2]
            scheme = "mqtts" if server is self._tls_server else "mqtt"
            urls.append(f"{scheme}://{HostPort(host, port)}")
        return urls

    @property
    def address(self) -> HostPort:
        """The first address actually listened on."""
        if not self._servers:
            raise RuntimeError("front end is not started")
        host, port = self._servers[0].sockets[0].getsockname()[:2]
        return HostPort(host, port)

    def reload(self) -> None:
        """SIGHUP: re-read the password and ACL files and the TLS certificates; open connections stay."""
        self.security.reload()
        config = self._config
        if self.tls is not None:
            try:
                load_certificates(self.tls, config.certfile, config.keyfile, config.cafile)  # type: ignore[arg-type]
                log.info("reloaded the TLS certificate %s", config.certfile)
            except ShoalError as exc:
                log.error("reload: %s; keeping the previous certificate", exc)
        if self._broker is not None:
            self._broker.rules_changed()

    async def start(self) -> None:
        """Start amqtt, then listen. StartupError if the address can't be bound."""
        logging.getLogger("amqtt.broker").addFilter(_QUIET_CLOSED)  # once: addFilter ignores a filter it has
        config = self._config
        self._broker = ShoalBroker(amqtt_config(config), self._queues, config.connect_timeout,
                                   Limits(max_inflight=config.max_inflight_messages,
                                          max_queued=config.max_queued_messages,
                                          max_queued_bytes=config.max_queued_bytes,
                                          expiry=config.persistent_client_expiration),
                                   self.security)
        await self._broker.start()
        max_packet_size = self._config.max_packet_size
        loop = asyncio.get_running_loop()
        for listen, context in ((config.listen, None), (config.tls_listen, self.tls)):
            if listen is None:
                continue
            try:
                server = await loop.create_server(
                    lambda: QueueFastProtocol(self._on_connection, max_packet_size),
                    listen.host, listen.port, reuse_address=True, backlog=1024, ssl=context,
                    ssl_handshake_timeout=config.connect_timeout if context is not None else None,
                )
            except OSError as exc:
                for server in self._servers:
                    server.close()
                await self._broker.shutdown()
                raise StartupError(f"cannot listen on {listen}: {os_error_text(exc)}") from None
            self._servers.append(server)
            if context is not None:
                self._tls_server = server
        log.info("MQTT listening on %s", ", ".join(self.addresses))

    async def stop(self) -> None:
        """Stop listening, close the client sessions, and wait for them within a deadline."""
        for server in self._servers:
            server.close()
        if self._broker is not None:
            try:
                await asyncio.wait_for(self._broker.shutdown(), SHUTDOWN_DEADLINE)
            except TimeoutError:
                log.warning("amqtt did not shut down within %.0f s", SHUTDOWN_DEADLINE)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=SHUTDOWN_DEADLINE)
        for server in self._servers:
            await server.wait_closed()
        self.security.close()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._broker is not None
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        stats.FRONT_END.connections += 1
        peer = writer.get_extra_info("peername")

        def refused(exc: MalformedPacket) -> None:
            log.warning("connection from %s:%s sent %s; closing it", *peer[:2], refusal(exc))
            writer.transport.abort()

        try:
            await self._broker.external_connected(
                FrameGuardReader(reader, self._config.max_packet_size, refused), StreamWriterAdapter(writer),
                LISTENER,
            )
        except (asyncio.CancelledError, MalformedPacket):
            pass
        except Exception as exc:  # one bad connection must never take the listener down
            log.warning("connection from %s ended with an error: %s", writer.get_extra_info("peername"), exc)
        finally:
            self._connections.discard(task)
            writer.close()
