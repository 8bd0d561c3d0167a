"""A cluster of real broker processes on one real etcd, for the cluster tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support import BrokerProcess, EtcdProcess, free_port, wait_until

CLUSTER = "shoalmq"


class Cluster:
    """Nodes ``n1``, ``n2``, ... of one cluster, each a ``broker`` process with ``--etcd``."""

    def __init__(self, etcd: EtcdProcess, workdir: Path, queues: dict[str, int] | None = None,
                 args: Sequence[str] = (), lease_ttl: int = 3) -> None:
        self.etcd = etcd
        self.workdir = workdir
        self.args = list(args)
        self.lease_ttl = lease_ttl
        self.nodes: dict[str, BrokerProcess] = {}
        self.config = workdir / "cluster.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        lines = ["queues:"] + [f"  {name}: {{partitions: {count}}}" for name, count in (queues or {}).items()]
        self.config.write_text("\n".join(lines) + "\n" if queues else "{}\n")

    def add(self, node_id: str, *, start: bool = True, args: Sequence[str] = ()) -> BrokerProcess:
        existing = self.nodes.get(node_id)
        node = BrokerProcess(self.workdir / node_id, [
            "--etcd", self.etcd.url, "--node-id", node_id, "--cluster", CLUSTER, "--config", str(self.config),
            "--grpc-listen", f"127.0.0.1:{free_port()}", "--lease-ttl", str(self.lease_ttl), "--log-level", "debug",
            *self.args, *args], port=existing.port if existing else None,
            data_dir=existing.data_dir if existing else None)
        self.nodes[node_id] = node
        if start:
            node.start(timeout=30)
        return node

    def stop(self) -> None:
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
        return {int(key.rpartition("/")[2]): value["owner"] for key, value in self.keys("partitions/").items()
                if key.rpartition("/")[0] == queue}

    def live(self) -> set[str]:
        return set(self.keys("nodes/"))

    def wait_settled(self, queue: str, partitions: int, nodes: Sequence[str] | None = None,
                     timeout: float = 30) -> dict[int, str]:
        """Wait until every partition of ``queue`` has an owner, among ``nodes`` (default: the running ones),
        each of them owning some."""
        expected = set(nodes) if nodes is not None else {n for n, p in self.nodes.items() if p.running}

        def settled() -> dict[int, str] | None:
            owners = self.owners(queue)
            if (len(owners) == partitions and set(owners.values()) == expected and self.live() == expected):
                return owners
            return None

        return wait_until(settled, timeout, f"partitions of {queue} owned by {sorted(expected)}")
