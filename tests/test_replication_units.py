"""The replication state machine (``shoalmq.cluster.replication``), deterministic: three replicators in one event
loop on in-memory stores, an in-memory etcd with compare-and-swap and a watch each node can be cut from, and
in-memory replication streams the test can cut per pair of nodes. Time is a fake clock the test moves; the periodic
checks run when the test calls ``tick``. Each test scripts one order of messages and faults (the style of etcd's
raft package tests): commit on the in-sync set, the ISR shrinking and growing, ``min_insync`` holding publishes,
failover, fencing of a deposed leader, truncation of a diverged tail, and a replica back on an empty disk."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from shoalmq.cluster import replication as R
from shoalmq.cluster.assignment import HashPartitionAssigner
from shoalmq.cluster.etcd import EtcdUnavailable, KeyValue, WatchEvent
from shoalmq.cluster.view import ClusterView
from shoalmq.errors import NotOwner
from shoalmq.queue.config import QueueConfig
from shoalmq.queue.manager import QueueManager
from shoalmq.queue.storage import MemoryBackend, Store
from tests.fakes import FakeConsumer, settle

pytestmark = pytest.mark.timeout(30)

QUEUE = "q"
KEY = (QUEUE, 0)
CONFIG = QueueConfig(partitions=1, replication_factor=3, replica_lag_ms=1000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEtcd:
    """Compare-and-swap on a dict; every node's view gets the change as a watch event (unless cut from etcd)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.kv: dict[bytes, KeyValue] = {}
        self.revision = 0

    def put_if_revision_sync(self, key: bytes, value: bytes, mod_revision: int) -> tuple[int, KeyValue | None]:
        current = self.kv.get(key)
        if (current.mod_revision if current else 0) != mod_revision:
            return 0, current
        self.revision += 1
        kv = KeyValue(key, value, self.revision, current.create_revision if current else self.revision, 0)
        self.kv[key] = kv
        for node in self.world.nodes.values():
            if node.name not in self.world.etcd_cut:
                asyncio.get_running_loop().call_soon(node.view._owners_events, [WatchEvent("put", kv)])
        return self.revision, None

    def client_for(self, node: str) -> Any:
        etcd = self

        class Client:
            async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
                await asyncio.sleep(0)
                if node in etcd.world.etcd_cut:
                    raise EtcdUnavailable("etcd unreachable")
                return fn(*args)

            put_if_revision_sync = etcd.put_if_revision_sync

        return Client()

    def record(self) -> dict[str, Any]:
        return json.loads(self.kv[f"/c/partitions/{QUEUE}/0".encode()].value)


class Membership:
    def __init__(self, name: str, world: World) -> None:
        self.node_id, self.cluster, self.lease = name, "c", 1
        self.world = world
        self.on_change: list[Any] = []
        self.on_lease_lost: list[Any] = []
        self.on_lease_regained: list[Any] = []

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n: {"grpc": n} for n in self.world.live}

    draining = False

    def serving(self) -> list[str]:
        return sorted(self.nodes)

    def lease_valid(self) -> bool:
        return True


class Definitions:
    def servable(self, name: str) -> bool:
        return True


class FakeStream:
    """A ``PeerStream`` over memory to the node named by ``target``. A cut breaks it (as gRPC's keepalive does a
    stream whose packets stop), and it opens again once the cut heals, starting with ``first()``."""

    def __init__(self, world: World, owner: str, target: str, method: str, on_response: Callable[[Any], None],
                 on_lost: Callable[[Any], None], *, reconnect_delay: float | None = None,
                 first: Callable[[], list[Any]] | None = None) -> None:
        assert method == "Replicate"
        self.world, self.owner, self.target = world, owner, target
        self.on_response, self.on_lost, self.first = on_response, on_lost, first
        self.connected = False
        self.closed = False
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if not self.closed and (self.task is None or self.task.done()):
            self.task = asyncio.ensure_future(self._run())

    def send(self, request: Any) -> None:
        self.start()
        self.requests.put_nowait(request)

    def _cut(self) -> bool:
        return self.world.is_cut(self.owner, self.target)

    async def _requests(self, requests: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        for request in self.first() if self.first else ():
            yield request
        while True:
            request = await requests.get()
            if request is None or self._cut():
                return
            yield request

    async def _run(self) -> None:
        while not self.closed:
            while self._cut():
                await asyncio.sleep(0.001)
            self.connected = True
            requests = self.requests = asyncio.Queue()
            leader = self.world.nodes[self.target].replicator
            async for response in leader.serve(self._requests(requests), self.owner):
                if self._cut() or self.closed:
                    break
                self.on_response(response)
            self.connected = False
            requests.put_nowait(None)
            if not self.closed:
                self.on_lost(R.PeerGone(f"stream to {self.target} broke"))
            await asyncio.sleep(0.001)

    async def close(self) -> None:
        self.closed = True
        self.requests.put_nowait(None)
        if self.task is not None:
            self.task.cancel()


class Node:
    def __init__(self, name: str, world: World) -> None:
        self.name = name
        self.world = world
        self.backend = MemoryBackend()
        self.open()

    def open(self) -> None:
        world = self.world
        self.store = Store(self.backend)
        self.manager = QueueManager(self.store, {QUEUE: CONFIG})
        self.membership = Membership(self.name, world)
        etcd = world.etcd.client_for(self.name)
        self.view = ClusterView(etcd, self.membership)  # (not started: FakeEtcd feeds it)
        self.view.definitions = {QUEUE: CONFIG}
        self.view._owners_snapshot(list(world.etcd.kv.values()))  # (what the watch starts with)
        self.replicator = R.Replicator(etcd, self.membership, self.view, self.manager, Definitions(),
                                       HashPartitionAssigner(), clock=world.clock,
                                       open_stream=lambda *a, **k: FakeStream(world, self.name, *a, **k))
        self.replicator.probe_peer = self._probe
        self.replicator.attach()

    async def _probe(self, node: str, target: str, request: Any) -> list[Any]:
        await asyncio.sleep(0)
        if self.world.is_cut(self.name, node):
            raise TimeoutError  # (no answer: as PROBE_TIMEOUT does)
        return list(self.world.nodes[node].replicator.probe(request).partitions)

    @property
    def part(self) -> Any:
        return self.manager.queue(QUEUE).partition(0)

    def publish(self, *payloads: bytes) -> asyncio.Future[None]:
        return self.manager.publish_many(f"$queue/{QUEUE}/k", list(payloads))

    def payloads(self) -> list[bytes]:
        part = self.part
        return [payload for _, payload, _ in part.read_messages(0, 10_000)]


class World:
    def __init__(self, names: tuple[str, ...] = ("a", "b", "c")) -> None:
        self.clock = Clock()
        self.live = set(names)
        self.cuts: set[frozenset[str]] = set()
        self.etcd_cut: set[str] = set()
        self.etcd = FakeEtcd(self)
        self.nodes: dict[str, Node] = {}
        for name in names:
            self.nodes[name] = Node(name, self)

    def is_cut(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.cuts or a not in self.live or b not in self.live

    def cut(self, a: str, *others: str) -> None:
        for b in others or tuple(n for n in self.nodes if n != a):
            self.cuts.add(frozenset((a, b)))

    def heal(self) -> None:
        self.cuts.clear()

    async def tick(self, seconds: float = R.TICK, times: int = 1) -> None:
        """Let ``seconds`` pass, ``times`` over, in steps of at most one TICK (heartbeats flow in each)."""
        for _ in range(times):
            left = seconds
            while left > 1e-9:
                step = min(left, R.TICK)
                left -= step
                self.clock.now += step
                for node in self.nodes.values():
                    if node.name in self.live:
                        node.replicator._tick()
                await settle()

    def leader(self) -> Node:
        return self.nodes[self.etcd.record()["leader"]]

    def followers(self) -> list[Node]:
        name = self.etcd.record()["leader"]
        return [n for n in self.nodes.values() if n.name != name]

    async def start(self) -> Node:
        for node in self.nodes.values():
            node.replicator.reconcile()
        await settle(lambda: bool(self.etcd.kv) and all(
            self.nodes[n].replicator.leaders.get(KEY) or self.nodes[n].replicator.followers.get(KEY)
            for n in self.live))
        await self.tick(times=3)
        await settle(lambda: set(self.etcd.record()["isr"]) == self.live)
        return self.leader()


def run(body: Callable[[], Any]) -> None:
    asyncio.run(body())


def test_a_publish_commits_once_every_in_sync_replica_has_it_on_disk() -> None:
    async def body() -> None:
        world = World()
        leader = await world.start()
        assert world.etcd.record()["epoch"] == 1
        done = leader.publish(b"one", b"two")
        await settle(done.done)
        assert done.exception() is None
        for follower in world.followers():
            await settle(lambda f=follower: len(f.payloads()) == 2)
            assert [p[-3:] for p in follower.payloads()] == [b"one", b"two"]
        # A follower that stops answering holds the commit (it is in the ISR) until it leaves the ISR.
        slow = world.followers()[1]
        world.cut(leader.name, slow.name)
        held = leader.publish(b"three")
        await settle()
        await world.tick(times=5)
        assert not held.done(), "committed without an in-sync replica"
        await world.tick(seconds=1.1)
        await settle(held.done)
        assert held.exception() is None
        assert slow.name not in world.etcd.record()["isr"]
        # Healed, it catches up and joins again.
        world.heal()
        await world.tick(times=3)
        await world.tick(seconds=0.2, times=10)
        await settle(lambda: slow.name in world.etcd.record()["isr"])
        assert len(slow.payloads()) == 3
    run(body)


def test_fewer_than_min_insync_replicas_hold_publishes_and_nothing_is_acknowledged() -> None:
    async def body() -> None:
        world = World()
        leader = await world.start()
        b, c = world.followers()
        world.live -= {b.name, c.name}  # both followers die
        held = leader.publish(b"x")
        await world.tick(seconds=1.1, times=3)
        assert not held.done()
        # One follower may leave the ISR, the second may not (min_insync 2).
        isr = world.etcd.record()["isr"]
        assert len(isr) == 2 and leader.name in isr
        # Whichever comes back, the leader acknowledges again (with it, once the other leaves the ISR).
        gone = next(n for n in isr if n != leader.name)
        back = c if gone == b.name else b
        world.live.add(back.name)
        await world.tick(seconds=0.2, times=15)
        await settle(held.done)
        assert held.exception() is None
        assert set(world.etcd.record()["isr"]) == {leader.name, back.name}
    run(body)


def test_a_silent_leader_is_replaced_and_a_deposed_leader_gets_nothing_acknowledged() -> None:
    async def body() -> None:
        world = World()
        old = await world.start()
        assert (await_ok := old.publish(b"before")) is not None
        await settle(await_ok.done)
        # The leader is cut off from both followers, and from etcd's watch: it goes on believing it leads.
        world.cut(old.name)
        world.etcd_cut.add(old.name)
        await world.tick(seconds=R.FAILOVER_TIMEOUT + 0.01)
        await world.tick(seconds=R.RANK_DELAY + 0.01)
        await settle(lambda: world.etcd.record()["leader"] != old.name)
        record = world.etcd.record()
        assert record["epoch"] == 2 and old.name not in record["isr"]
        new = world.nodes[record["leader"]]
        await settle(lambda: KEY in new.replicator.leaders)
        # The old leader appends what its clients send; nothing of it can be acknowledged.
        stale = old.publish(b"stale")
        await world.tick(seconds=1.1, times=3)
        assert not stale.done() or stale.exception() is not None
        # The new one commits with the remaining follower.
        fresh = new.publish(b"fresh")
        await world.tick(times=3)
        await settle(fresh.done)
        assert fresh.exception() is None
        # Healed, the old leader learns of the new record, gives up, and follows: its stale tail is cut.
        world.heal()
        world.etcd_cut.clear()
        old.view._owners_events([WatchEvent("put", world.etcd.kv[f"/c/partitions/{QUEUE}/0".encode()])])
        await settle(stale.done)
        assert isinstance(stale.exception(), NotOwner)
        await world.tick(times=5)
        await settle(lambda: [p[-5:] for p in old.payloads()] == [b"efore", b"fresh"])
    run(body)


def test_a_follower_whose_log_diverged_is_cut_back_to_the_new_leaders_history() -> None:
    async def body() -> None:
        world = World()
        old = await world.start()
        first = old.publish(b"m0", b"m1")
        await settle(first.done)
        b, c = sorted(world.followers(), key=lambda n: n.name)
        # The leader's next messages reach b only (c is cut from the old leader): not committed (c is in the ISR).
        world.cut(old.name, c.name)
        tail = old.publish(b"t2", b"t3", b"t4")
        await settle(lambda: len(b.payloads()) == 5)
        assert len(c.payloads()) == 2 and not tail.done()
        # The old leader dies; b cannot reach etcd, so c (behind, but in sync: it has everything committed) wins.
        world.live.discard(old.name)
        world.etcd_cut.add(b.name)
        await world.tick(seconds=R.FAILOVER_TIMEOUT + R.RANK_DELAY * 2 + 0.01, times=2)
        await settle(lambda: world.etcd.record()["leader"] == c.name)
        assert world.etcd.record()["epoch"] == 2
        await settle(lambda: KEY in c.replicator.leaders)
        assert c.part.epochs[-1] == (2, 2)
        new = c.publish(b"n2")
        # b comes back to etcd, follows c, and cuts its tail (offsets 2..4 of epoch 1) before taking c's.
        world.etcd_cut.clear()
        b.view._owners_events([WatchEvent("put", world.etcd.kv[f"/c/partitions/{QUEUE}/0".encode()])])
        await world.tick(times=5)
        await settle(new.done)
        assert new.exception() is None
        assert [p[-2:] for p in b.payloads()] == [b"m0", b"m1", b"n2"]
        assert b.part.epochs == c.part.epochs == [(1, 0), (2, 2)]
    run(body)


def test_a_replica_back_on_an_empty_disk_never_leads_and_catches_up_from_disk(monkeypatch: pytest.MonkeyPatch,
                                                                               ) -> None:
    monkeypatch.setattr(R, "BUFFER_BYTES", 64)  # followers behind read from the leader's disk

    async def body() -> None:
        world = World()
        leader = await world.start()
        done = leader.publish(*[f"m{i}".encode() for i in range(20)])
        await settle(done.done)
        # Consume and ack the first 5 on the leader: the acks reach the followers.
        consumer = FakeConsumer("c1", window=5)
        leader.manager.subscribe(consumer, QUEUE)
        await settle(lambda: len(consumer.received) == 5)
        consumer.ack_all(leader.manager)
        await world.tick(times=3)
        wiped = world.followers()[0]
        await settle(lambda: len(wiped.payloads()) == 15)
        # Its disk is lost; it comes back empty, under the same name.
        await wiped.replicator.stop()
        wiped.backend = MemoryBackend()
        wiped.open()
        more = leader.publish(b"after")
        wiped.replicator.reconcile()
        assert not wiped.replicator.followers[KEY].eligible(R.parse_record(
            json.dumps(world.etcd.record()).encode(), 0))  # type: ignore[arg-type]
        await world.tick(times=5)
        await world.tick(seconds=1.1, times=3)
        await settle(more.done)
        await settle(lambda: len(wiped.payloads()) == 16)
        assert [p[-5:] for p in wiped.payloads()][-1] == b"after"
        await world.tick(seconds=0.2, times=5)
        await settle(lambda: wiped.name in world.etcd.record()["isr"])
        assert wiped.part.epoch > 0  # synced: it may lead from now on
    run(body)



def test_a_join_moves_the_replicas_and_the_leadership_to_the_placement_one_step_at_a_time() -> None:
    async def body() -> None:
        # "0" sorts first: with it, the hash placement of q/0 is 0, a, b (c drops out, 0 leads).
        world = World(("0", "a", "b", "c"))
        world.live.discard("0")  # it joins later
        await world.start()
        before = world.etcd.record()
        wanted = HashPartitionAssigner().replicas(QUEUE, 0, ["0", "a", "b", "c"], 3)
        assert set(before["replicas"]) != set(wanted) and before["leader"] != wanted[0]
        done = world.leader().publish(b"m0", b"m1")
        await settle(done.done)
        world.live.add("0")
        for _ in range(40):
            await world.tick(seconds=0.2)
            record = world.etcd.record()
            if (set(record["replicas"]) == set(wanted) and record["leader"] == wanted[0]
                    and set(record["isr"]) == set(wanted)):
                break
        record = world.etcd.record()
        assert set(record["replicas"]) == set(wanted), (before, record)
        assert record["leader"] == wanted[0] and set(record["isr"]) == set(wanted)
        assert len(record["replicas"]) == 3
        # Nothing was lost on the way, and the new placement commits.
        after = world.leader().publish(b"m2")
        await world.tick(times=5)
        await settle(after.done)
        assert after.exception() is None
        for name in wanted:
            await settle(lambda n=name: [p[-2:] for p in world.nodes[n].payloads()] == [b"m0", b"m1", b"m2"])
    run(body)
