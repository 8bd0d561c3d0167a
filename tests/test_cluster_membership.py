"""Cluster membership and partition assignment, against a real etcd (Debian's etcd-server)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from shoalmq.cluster.assignment import HashPartitionAssigner
from shoalmq.cluster.etcd import Etcd, EtcdUnavailable, PrefixWatch, parse_endpoints, prefix_end
from shoalmq.cluster.membership import Membership, NodeIdInUse
from shoalmq._native import fnv1a_32
from tests.support import EtcdProcess, free_port


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# -- pure parts ---------------------------------------------------------------------------------------------------

def test_endpoints_and_prefix_ranges() -> None:
    assert parse_endpoints("http://127.0.0.1:2379, 10.0.0.2:4001") == ["http://127.0.0.1:2379",
                                                                         "http://10.0.0.2:4001"]
    for bad in ("", "ftp://x:1", "http://nohost", "http://:1"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\x00"


def test_hash_assigner_follows_the_formula_and_spreads_partitions() -> None:
    assigner = HashPartitionAssigner()
    nodes = ["n3", "n1", "n2"]
    for queue in ("orders", "jobs", "q"):
        owners = assigner.assign(queue, 8, nodes)
        assert owners == [sorted(nodes)[(p + fnv1a_32(queue.encode())) % 3] for p in range(8)]
        assert owners == [assigner.owner(queue, p, list(reversed(nodes))) for p in range(8)]
        counts = Counter(owners)
        assert set(counts) == set(nodes) and max(counts.values()) - min(counts.values()) <= 1
    firsts = {assigner.owner(q, 0, nodes) for q in ("a", "b", "c", "d", "e", "f", "g")}
    assert len(firsts) > 1, "partition 0 of every queue must not land on the same node"
    with pytest.raises(ValueError):
        assigner.owner("q", 0, [])


# -- etcd --------------------------------------------------------------------------------------------------------

def test_client_basics_and_create_if_absent(etcd: EtcdProcess) -> None:
    async def body() -> None:
        client = Etcd(parse_endpoints(etcd.url))
        created, existing = await client.call(client.create_sync, b"/t/q", b'{"partitions": 8}')
        assert created and existing is None
        created, existing = await client.call(client.create_sync, b"/t/q", b'{"partitions": 3}')
        assert not created and existing is not None and existing.value == b'{"partitions": 8}'
        await client.call(client.put_sync, b"/t/r", "\u20ac".encode())
        kvs, revision = await client.call(client.get_prefix_sync, b"/t/")
        assert [(kv.key, kv.value) for kv in kvs] == [(b"/t/q", b'{"partitions": 8}'), (b"/t/r", "\u20ac".encode())]
        assert revision >= max(kv.mod_revision for kv in kvs)
        assert etcd.etcdctl("get", "--print-value-only", "/t/r").strip() == "\u20ac"
        client.close()

    run(body())


def test_failover_to_the_next_endpoint_and_a_clear_error_when_none_answers(etcd: EtcdProcess) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def body() -> None:
        client = Etcd([dead, etcd.url], timeout=1)
        await client.call(client.put_sync, b"/f", b"1")
        assert client.endpoint == etcd.url
        client.close()
        nobody = Etcd([dead], timeout=1)
        with pytest.raises(EtcdUnavailable, match="etcd unreachable"):
            await nobody.call(nobody.get_sync, b"/f")
        nobody.close()

    run(body())


def test_nodes_see_each_other_join_and_leave(etcd: EtcdProcess) -> None:
    async def body() -> None:
        client = Etcd(parse_endpoints(etcd.url))
        a = Membership(client, "shoalmq", "n1", {"mqtt": "127.0.0.1:1"}, ttl=2)
        b = Membership(client, "shoalmq", "n2", {"mqtt": "127.0.0.1:2"}, ttl=2)
        await a.start()
        await b.start()
        await eventually(lambda: set(a.nodes) == {"n1", "n2"}, 5, "n1 to see n2")
        assert b.nodes["n1"]["mqtt"] == "127.0.0.1:1"
        shown = etcd.etcdctl("get", "--prefix", "/shoalmq/nodes/")
        assert json.loads(shown.splitlines()[1])["node_id"] == "n1"
        await b.stop()
        await eventually(lambda: set(a.nodes) == {"n1"}, 5, "n1 to see n2 leave")
        with pytest.raises(NodeIdInUse):
            await Membership(client, "shoalmq", "n1", {}, ttl=2).start()
        await a.stop()
        client.close()

    run(body())


@pytest.mark.timeout(60)
def test_a_crashed_node_disappears_when_its_lease_expires(etcd: EtcdProcess) -> None:
    async def body() -> None:
        client = Etcd(parse_endpoints(etcd.url))
        watcher = Membership(client, "c", "watcher", {}, ttl=2)
        crashed = Membership(client, "c", "crashed", {}, ttl=2)
        await watcher.start()
        await crashed.start()
        await eventually(lambda: "crashed" in watcher.nodes, 5, "the join")
        assert crashed._keepalive_task is not None
        crashed._keepalive_task.cancel()  # it stops refreshing, as a killed process would; no revoke
        crashed._watch.stop()  # type: ignore[union-attr]
        await eventually(lambda: "crashed" not in watcher.nodes, 10, "the lease to expire")
        await watcher.stop()
        client.close()

    run(body())


@pytest.mark.timeout(90)
def test_membership_survives_an_etcd_restart(etcd: EtcdProcess) -> None:
    async def body() -> None:
        client = Etcd(parse_endpoints(etcd.url), timeout=1)
        a = Membership(client, "r", "a", {}, ttl=3)
        await a.start()
        await asyncio.get_running_loop().run_in_executor(None, etcd.stop)
        await asyncio.get_running_loop().run_in_executor(None, etcd.start)
        late = Membership(Etcd(parse_endpoints(etcd.url)), "r", "late", {}, ttl=3)
        await late.start()
        await eventually(lambda: "late" in a.nodes, 15, "the watch to resume after the restart")
        await eventually(lambda: a.healthy and "a" in late.nodes, 15, "a to be registered and healthy")
        await late.stop()
        await eventually(lambda: "late" not in a.nodes, 10, "the leave after the restart")
        assert a._watch is not None and a._watch.reconnects >= 1
        await a.stop()
        client.close()

    run(body())


def test_a_watch_from_a_compacted_revision_relists(etcd: EtcdProcess) -> None:
    async def body() -> None:
        client = Etcd(parse_endpoints(etcd.url))
        for i in range(5):
            await client.call(client.put_sync, b"/w/k%d" % i, b"v")
        revision = await client.call(client.put_sync, b"/w/k0", b"v2")
        await client.call(client.compact_sync, revision)
        snapshots: list[list[bytes]] = []
        watch = PrefixWatch(client, b"/w/", lambda kvs: snapshots.append([kv.key for kv in kvs]), lambda e: None)
        watch.revision = 1  # as if it had been away since revision 1, now compacted
        await asyncio.get_running_loop().run_in_executor(None, watch._stream_once)
        await eventually(lambda: len(snapshots) == 1, 5, "the re-list")
        assert snapshots[0] == [b"/w/k%d" % i for i in range(5)] and watch.relists == 1
        assert watch.revision == revision
        client.close()

    run(body())
