"""A cluster of real broker processes on one real etcd, for the cluster tests."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support import BrokerProcess, EtcdProcess, free_port, wait_until

CLUSTER = "shoalmq"


class Cluster:
    """Nodes ``n1``, ``n2``, ... of one cluster, each a ``broker`` process with ``--etcd``."""

    def __init__(self, etcd: EtcdProcess, workdir: Path, queues: dict[str, int] | None = None,
                 args: Sequence[str] = (), lease_ttl: int = 3, tls: bool = False) -> None:
        """``tls``: mutual TLS between the nodes (each gets a certificate naming it, from a CA of the cluster's);
        a node on an address other than loopback always has it (a node refuses to join without it there)."""
        self.etcd = etcd
        self.tls = tls
        self._authority: Any = None
        self.workdir = workdir
        # Queues of one replica unless a test asks for more (the cluster default is 3): most cluster tests are of
        # the lease-owned partitions.
        self.args = list(args) if "--replication-factor" in args else ["--replication-factor", "1", *args]
        self.lease_ttl = lease_ttl
        self.nodes: dict[str, BrokerProcess] = {}
        self.config = workdir / "cluster.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        lines = ["queues:"] + [f"  {name}: {{partitions: {count}}}" for name, count in (queues or {}).items()]
        self.config.write_text("\n".join(lines) + "\n" if queues else "{}\n")

    def add(self, node_id: str, *, start: bool = True, args: Sequence[str] = (), host: str = "127.0.0.1",
            prefix: Sequence[str] = ()) -> BrokerProcess:
        """Start (or restart, on the same port and data directory) a node. ``host``: the address it listens on
        for MQTT and gRPC, and advertises (other than loopback: ``--advertise`` it); ``prefix``: a command it runs
        under (``BrokerProcess``), e.g. to run it in an ``IsolatedHost``'s network namespace."""
        existing = self.nodes.get(node_id)
        # (a broker that authenticates nobody must be told that it may listen beyond loopback)
        advertise = ["--advertise", host, "--allow-anonymous", "true"] if host != "127.0.0.1" else []
        if self.tls or host != "127.0.0.1":
            advertise += self.node_credentials(node_id, host)
        node = BrokerProcess(self.workdir / node_id, [
            "--etcd", self.etcd.url, "--node-id", node_id, "--cluster", CLUSTER, "--config", str(self.config),
            "--grpc-listen", f"{host}:{free_port()}", *advertise, "--lease-ttl", str(self.lease_ttl),
            "--log-level", "debug", *self.args, *args], port=existing.port if existing else None,
            data_dir=existing.data_dir if existing else None, host=host, prefix=prefix,
            http_port=existing.http_port if existing else None)
        self.nodes[node_id] = node
        if start:
            node.start(timeout=30)
        return node

    def stop(self) -> None:
        """Stop every node (SIGTERM to all at once, then wait for each)."""
        for node in self.nodes.values():
            if node.running:
                node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for node in self.nodes.values():
            node.stop()

    # -- what etcd says --------------------------------------------------------------------------------------

    def keys(self, prefix: str) -> dict[str, Any]:
        client = self.etcd.client()
        out = {}
        for value, meta in client.get_prefix(f"/{CLUSTER}/{prefix}"):
            out[meta["key"].decode()[len(f"/{CLUSTER}/{prefix}"):]] = json.loads(value)
        return out

    def owners(self, queue: str) -> dict[int, str]:
        return {int(key.rpartition("/")[2]): value.get("owner") or value.get("leader")
                for key, value in self.keys("partitions/").items() if key.rpartition("/")[0] == queue}

    def live(self) -> set[str]:
        return set(self.keys("nodes/"))

    def node_credentials(self, node_id: str, host: str = "127.0.0.1") -> list[str]:
        """The flags of mutual TLS for ``node_id``: a certificate naming it, valid for ``host`` and loopback."""
        from tests.tls_support import Authority
        if self._authority is None:
            self._authority = Authority(self.workdir / "pki", "Cluster CA")
        pair = self._authority.issue(node_id, server=True, addresses=tuple(dict.fromkeys((host, "127.0.0.1"))))
        return ["--cluster-certfile", str(pair.cert), "--cluster-keyfile", str(pair.key),
                "--cluster-cafile", str(self._authority.path)]

    def wait_settled(self, queue: str, partitions: int, nodes: Sequence[str] | None = None,
                     timeout: float = 30) -> dict[int, str]:
        """Wait until every partition of ``queue`` has an owner among ``nodes`` (default: the running ones), each
        of them owning some (when there are enough partitions)."""
        expected = set(nodes) if nodes is not None else {n for n, p in self.nodes.items() if p.running}

        def settled() -> dict[int, str] | None:
            owners = self.owners(queue)
            owning = set(owners.values())
            spread = owning == expected if partitions >= len(expected) else owning <= expected
            if len(owners) == partitions and spread and self.live() == expected:
                return owners
            return None

        return wait_until(settled, timeout, f"partitions of {queue} owned by {sorted(expected)}")


class LoadPublisher:
    """Publishes ``$queue/<queue>/k<n % keys>`` messages ``<key>:<seq>`` one by one (QoS 1) from a thread,
    and records every one the broker acknowledged, and the longest wait for an acknowledgement."""

    def __init__(self, port: int, queue: str, keys: int = 8, timeout: float = 60, host: str = "127.0.0.1") -> None:
        from tests.support import MqttClient

        self.client = MqttClient(port, host=host, timeout=timeout).connect()
        self.queue = queue
        self.keys = keys
        self.acked: list[bytes] = []
        self.longest_wait = 0.0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LoadPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        seq = 0
        try:
            while not self._stop.is_set():
                key = f"k{seq % self.keys}"
                payload = f"{key}:{seq}".encode()
                started = time.monotonic()
                self.client.publish(f"$queue/{self.queue}/{key}", payload)
                self.longest_wait = max(self.longest_wait, time.monotonic() - started)
                self.acked.append(payload)
                seq += 1
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def wait_for(self, count: int, timeout: float = 60) -> None:
        wait_until(lambda: len(self.acked) >= count or self.error, timeout, f"{count} acknowledged publishes")
        if self.error is not None:
            raise self.error

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join(90)
        self.client.disconnect()
        if self.error is not None:
            raise self.error
        return self.acked


class Drain:
    """A consumer that receives and acks from a thread, keeping everything it got in order."""

    def __init__(self, port: int, queue: str, host: str = "127.0.0.1") -> None:
        from tests.support import MqttClient

        self.client = MqttClient(port, host=host, manual_ack=True).connect()
        self.client.subscribe(f"$queue/{queue}")
        self.got: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import queue as queue_module

        while not self._stop.is_set():
            try:
                message = self.client.messages.get(timeout=0.1)
            except queue_module.Empty:
                continue
            self.client.ack(message)
            self.got.append(message.payload)

    def wait_for(self, expected: Sequence[bytes], timeout: float = 60) -> None:
        wanted = set(expected)
        wait_until(lambda: wanted <= set(self.got), timeout,
                   f"all {len(wanted)} messages (missing {len(wanted - set(self.got))})")

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join(10)
        self.client.disconnect()
        return self.got


def first_occurrences_in_order(received: Sequence[bytes]) -> bool:
    """Per key, the first delivery of each message comes in publish order (redeliveries may repeat)."""
    seen: set[bytes] = set()
    last: dict[bytes, int] = {}
    for payload in received:
        if payload in seen:
            continue
        seen.add(payload)
        key, _, seq = payload.partition(b":")
        if last.get(key, -1) > int(seq):
            return False
        last[key] = int(seq)
    return True
