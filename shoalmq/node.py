"""One broker node: wires the data directory, the MQTT front end and (later) the queue manager and cluster."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import Any

from shoalmq import __version__
from shoalmq.broker import MqttFrontEnd
from shoalmq.broker.security import is_loopback
from shoalmq.config import Config, base_url
from shoalmq.datadir import DataDir
from shoalmq.errors import ConfigError, ShoalError, StartupError
from shoalmq.queue.manager import QueueManager
from shoalmq.queue.storage import Store, open_lmdb_store

log = logging.getLogger(__name__)


class Node:
    """A running broker node. ``serve()`` runs it until SIGTERM or SIGINT, then shuts down in order.

    Its parts, once started (None before, and those a node does not have): ``store``, ``queues``, ``cluster``
    (with ``--etcd``), ``front_end`` and ``http`` (``shoalmq.ops``: metrics, the API, the dashboard, ``$SYS``)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self.started = time.time()
        self.store: Store | None = None
        self.queues: QueueManager | None = None
        self.cluster: ClusterMember | None = None
        self.front_end: MqttFrontEnd | None = None
        self.http: Any = None
        #: Serving: every part started, not yet stopping (``/readyz`` adds the cluster's own conditions).
        self.ready = False

    @property
    def http_address(self) -> str | None:
        return self.http.address if self.http is not None else None

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        config = self.config
        check_exposure(config)
        with DataDir.open(config.data_dir) as data_dir:
            store = self.store = open_lmdb_store(
                data_dir.path, sync=config.sync, batch_size=config.batch_size,
                flush_interval=config.flush_interval_ms / 1000, ring_capacity=config.ring_capacity,
                ring_bytes=config.ring_bytes, memory_budget=config.memory_budget)
            log.info("partition log: %d partition(s), %d message(s) recovered in %.0f ms (sync: %s)",
                     len(store.known_partitions()), store.recovered_messages, store.recovery_seconds * 1000,
                     config.sync)
            try:
                queues = self.queues = QueueManager(store, config.queues, config.queue_defaults,
                                                    config.consumer_window)
                queues.auto_create, queues.max_queues = config.auto_create_queues, config.max_queues
                for name, info in queues.describe().items():
                    log.info("queue %s: %d partition(s), %d message(s)", name, info["partitions"], info["depth"])
                cluster = self.cluster = ClusterMember(config, queues) if config.etcd else None
                await self._start_http()
                try:
                    if cluster is not None:
                        cluster.membership.info["http"] = self.http_address
                        await cluster.start()
                    front_end = self.front_end = MqttFrontEnd(config, queues)
                    await front_end.start()
                    loop.add_signal_handler(signal.SIGHUP, self._reload)
                    if self.http is not None:
                        self.http.started()
                    self.ready = True
                    mode = cluster.describe() if cluster is not None else "embedded (single node)"
                    log.info("ShoalMQ %s ready: %s, data %s, %s, event loop %s", __version__,
                             ", ".join(front_end.addresses + ([base_url(self.http_address)] if self.http_address else [])),
                             data_dir.path, mode, type(loop).__module__.split(".")[0])
                    try:
                        await self._stop.wait()
                    finally:
                        log.info("shutting down")
                        self.ready = False
                        loop.remove_signal_handler(signal.SIGHUP)
                        if self.http is not None:
                            await self.http.stop_background()
                        await front_end.stop()
                finally:
                    if cluster is not None:
                        await cluster.stop()
                    if self.http is not None:
                        await self.http.stop()
            finally:
                if self.queues is not None:
                    self.queues.close()
                await store.close()
        log.info("stopped")

    def _reload(self) -> None:
        """SIGHUP: the password and ACL files and the TLS certificates, of MQTT and of HTTPS, are read again."""
        if self.front_end is not None:
            self.front_end.reload()
        if self.http is not None:
            self.http.reload()

    async def _start_http(self) -> None:
        if self.config.http_listen is None:
            return
        from shoalmq.ops.http import OpsServer

        self.http = OpsServer(self)
        await self.http.start()


def check_exposure(config: Config) -> None:
    """Like mosquitto 2.0: a broker that authenticates nobody listens on loopback only. ConfigError (one line,
    exit code 2) for a listener on another address without a password file, client certificate identity or an
    explicit ``allow_anonymous: true``."""
    if config.password_file is not None or config.allow_anonymous is not None:
        return
    exposed = [str(address) for address in config.listeners if not is_loopback(address.host)
               and not (address is config.tls_listen and config.require_certificate)]
    if (config.http_listen is not None and not is_loopback(config.http_listen.host)
            and config.http_token_file is None):
        exposed.append(f"{config.http_listen} (HTTP)")
    if (config.http_listen is not None and not is_loopback(config.http_listen.host)
            and config.http_certfile is None):
        log.warning("the HTTP API listens on %s without TLS: its passwords and tokens cross the network in clear "
                    "(set --http-certfile and --http-keyfile, or keep it on a private network)", config.http_listen)
    if exposed:
        raise ConfigError(f"refusing to listen on {', '.join(exposed)} with no authentication: set password_file "
                          "(or a TLS listener with require_certificate), or allow_anonymous: true to accept "
                          "anyone")


class ClusterMember:
    """The cluster side of a node started with ``--etcd``: the gRPC server, membership and the coordinator."""

    def __init__(self, config: Config, queues: QueueManager) -> None:
        from shoalmq.cluster.assignment import assigner_named
        from shoalmq.cluster.coordinator import Coordinator
        from shoalmq.cluster.etcd import Etcd, etcd_access
        from shoalmq.cluster.membership import Membership

        assert config.etcd
        self.config = config
        self.queues = queues
        self.node_id = config.node_id or socket.gethostname().split(".")[0]
        self.etcd = Etcd(list(config.etcd), timeout=min(2.0, config.lease_ttl / 3),
                         access=etcd_access(config.etcd_cafile, config.etcd_certfile, config.etcd_keyfile,
                                            config.etcd_user, config.etcd_password_file))
        self.etcd.report_outages = True
        self.membership = Membership(self.etcd, config.cluster, self.node_id, {}, ttl=config.lease_ttl)
        self.coordinator = Coordinator(self.etcd, self.membership, queues, assigner_named(config.assigner),
                                       config.routing)
        self.server: Any = None

    def describe(self) -> str:
        return (f"node {self.node_id} of cluster {self.config.cluster} (gRPC {self.membership.info.get('grpc')}, "
                f"{self.config.routing} routing)")

    async def start(self) -> None:
        from shoalmq.cluster.membership import NodeIdInUse
        from shoalmq.cluster.service import NodeServicer
        from shoalmq.cluster.transport import NodeCredentials, start_server, use_credentials

        config = self.config
        advertise = config.advertise or config.mqtt_address.host
        grpc_host = config.grpc_listen.host if config.grpc_listen else config.mqtt_address.host
        grpc_listen = str(config.grpc_listen) if config.grpc_listen else f"{grpc_host}:0"
        if config.cluster_certfile is not None:
            assert config.cluster_keyfile is not None and config.cluster_cafile is not None
            use_credentials(NodeCredentials.load(config.cluster_certfile, config.cluster_keyfile,
                                                 config.cluster_cafile))
        elif not (is_loopback(grpc_host) and is_loopback(advertise)):
            raise ConfigError(f"refusing to join the cluster with gRPC on {grpc_host} (advertised as {advertise}) "
                              "without mutual TLS: set --cluster-certfile, --cluster-keyfile and --cluster-cafile "
                              "(a node reachable beyond loopback would take orders from anyone)")
        # Before anything can arrive over gRPC: ownership is checked (and refused until claims are made), and
        # nothing is delivered, to local consumers or peers' route streams, from a partition not claimed yet.
        self.queues.cluster = self.coordinator
        self.queues.ownership = self.coordinator
        self.queues.refresh_sources()
        self.server, port = await start_server(self.queues, grpc_listen, NodeServicer(self.queues, self.coordinator))
        self.membership.info.update({
            "mqtt": f"{advertise}:{config.mqtt_address.port}",
            "grpc": f"{advertise}:{port}",
            "version": __version__,
        })
        # Before it joins (no peer hands it anything yet): drop its copies of queues deleted while it was away.
        try:
            await self.coordinator.definitions.drop_deleted()
        except ShoalError as exc:
            raise StartupError(f"cannot join cluster {config.cluster} through etcd "
                               f"{','.join(config.etcd or ())}: {exc}") from None
        # After a crash, this node's old registration lives until its lease expires: wait that long for it.
        deadline = time.monotonic() + config.lease_ttl + 2
        waited = False
        while True:
            try:
                await self.membership.start()
                break
            except NodeIdInUse:
                if time.monotonic() >= deadline:
                    raise
                if not waited:
                    waited = True
                    log.info("node id %s is still registered, likely by this node's previous run: waiting up to "
                             "%.0f s for its lease to expire", self.node_id, deadline - time.monotonic())
                await asyncio.sleep(0.25)
            except ShoalError as exc:
                raise StartupError(f"cannot join cluster {config.cluster} through etcd "
                                   f"{','.join(config.etcd or ())}: {exc}") from None
        await self.coordinator.start()

    #: Seconds each step of leaving may take before the next one starts anyway.
    STOP_STEP_TIMEOUT = 5.0
    #: Seconds the handover on a graceful stop may take (what is left is handed over at the next start).
    LEAVE_TIMEOUT = 40.0

    async def stop(self) -> None:
        """Leave gracefully (hand everything over), then stop serving; each step bounded in time."""
        if self.coordinator.started:
            if not self.membership.lease_valid():
                log.warning("etcd is not answering: waiting up to %.0f s for it, to hand this node's partitions "
                            "over", self.LEAVE_TIMEOUT)
            try:
                await asyncio.wait_for(self.coordinator.leave(), self.LEAVE_TIMEOUT)
            except TimeoutError:
                log.warning("handing over took longer than %.0f s; leaving the rest on disk", self.LEAVE_TIMEOUT)
        steps = [("coordinator", self.coordinator.stop()), ("membership", self.membership.stop())]
        if self.server is not None:
            steps.append(("gRPC server", self.server.stop(1)))
        for name, step in steps:
            try:
                await asyncio.wait_for(step, self.STOP_STEP_TIMEOUT)
            except TimeoutError:
                log.warning("stopping the %s took over %.0f s; going on", name, self.STOP_STEP_TIMEOUT)
        self.etcd.close()
