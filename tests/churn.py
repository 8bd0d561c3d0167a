"""Cluster churn: real broker processes on a real etcd, real MQTT clients, and faults on a seeded schedule.

``run_churn(ChurnConfig(...), workdir)`` runs one scenario and returns a ``ChurnResult``; ``tests/test_churn.py``
runs a short one in the suite and a long one as a soak (``make soak``). From a shell::

    .venv/bin/python -m tests.churn --seed 3 --duration 60 --rate 500 --nodes 3 --workdir /tmp/churn

The scenario (everything seeded by ``random.Random(seed)``; the threads' timing is not):

- ``nodes`` broker nodes (``n1``..) of one cluster (``tests.cluster_support.Cluster``, ``--log-level debug``; each
  node keeps its MQTT port, gRPC port and data directory across restarts, as a real deployment would), on one
  ``EtcdProcess`` that is killed and restarted with the same data directory;
- ``publishers`` publisher threads (paho-mqtt, QoS 1, an in-flight window of ``window`` messages, ``rate``
  messages/s together) publishing ``$queue/<q>/kNN`` with payload ``kNN:<seq>:p<i>``; a message counts as
  acknowledged only when paho reports its PUBACK (``on_publish``). Each moves to another live node every
  ``move_every`` s and whenever its connection breaks, and sends again what was not acknowledged (at least once);
- ``consumers`` consumer threads with persistent sessions (``clean_session=False``, fixed client ids), manual acks,
  acking everything they receive at ``consume_ratio`` times the publish rate together (a backlog builds), moving to
  another live node when their connection breaks;
- a fault every ``fault_every`` s, in turn: SIGKILL a node and restart it ``kill_restart_after`` s later (same data
  directory); SIGTERM a node and restart it ``term_restart_after`` s after it exited; SIGKILL etcd and restart it
  ``etcd_restart_after`` s later; start an extra node and SIGTERM it ``join_stop_after`` s later; and, when
  ``faults`` names it, SIGSTOP a node past its lease and SIGCONT it ``pause_for`` s later (the suite version does);
- then publishing stops, the faults' restarts finish, and the consumers drain without a rate limit until every
  acknowledged message was seen, or nothing new arrived for ``quiet`` s; a consumer of ``$queue/<q>.dlq`` then
  drains the dead-letter queue, and ``broker cluster status --json`` shows what is left in the partitions.

Every wait has a deadline; the only fixed waits are the fault schedule's own delays (and short retry pauses).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import queue as queue_module
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.cluster_support import CLUSTER, Cluster
from tests.support import BIN_DIR, BrokerProcess, EtcdProcess, free_port


@dataclass
class ChurnConfig:
    seed: int = 1
    #: Seconds of publishing (faults run during it).
    duration: float = 40.0
    #: Messages per second, all publishers together.
    rate: float = 500.0
    nodes: int = 3
    publishers: int = 2
    consumers: int = 3
    #: Consumers start on the first this many nodes, in turn (None: spread over every node).
    consumer_nodes: int | None = None
    keys: int = 16
    partitions: int = 8
    queue: str = "churn"
    #: Consumers together ack this fraction of ``rate`` while publishing goes on.
    consume_ratio: float = 0.8
    #: Publisher in-flight window (messages sent, not yet PUBACKed).
    window: int = 100
    move_every: float = 10.0
    #: Seconds between faults; the first comes ``first_fault`` s after publishing starts.
    fault_every: float = 4.0
    first_fault: float = 4.0
    #: Fault kinds, taken in turn: "kill", "term", "etcd", "join", "pause" (SIGSTOP a node past its lease,
    #: ``pause_for`` s, then SIGCONT: it must stop writing before its partitions are taken over), and "wipe"
    #: (SIGKILL, its data directory deleted, back on an empty one: for replicated queues).
    faults: tuple[str, ...] = ("kill", "term", "etcd", "join")
    #: Each join of the extra node starts it on a fresh data directory (a new machine), not its previous one.
    join_fresh_data: bool = False
    kill_restart_after: float = 8.0
    term_restart_after: float = 3.0
    etcd_restart_after: float = 3.0
    #: Seconds a "pause" fault keeps a node stopped (default: its lease TTL + 2 s).
    pause_for: float | None = None
    join_stop_after: float = 8.0
    #: The drain ends once nothing new arrived for this long (or every acknowledged message was seen).
    quiet: float = 10.0
    drain_timeout: float = 180.0
    lease_ttl: int = 5
    #: Extra broker flags (every node).
    broker_args: tuple[str, ...] = ()
    #: Queue settings written into the cluster config (besides the partition count), e.g. {"max_deliveries": 0}.
    queue_settings: dict[str, Any] = field(default_factory=dict)


# -- shared records -----------------------------------------------------------------------------------------------

class Timeline:
    """What happened when: (monotonic time, wall clock, text). Wall clock matches the brokers' log timestamps."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self.events: list[tuple[float, float, str]] = []

    def note(self, text: str) -> float:
        now = time.monotonic()
        with self._lock:
            self.events.append((now, time.time(), text))
        return now

    def lines(self) -> list[str]:
        with self._lock:
            return [f"{mono - self.t0:8.2f}s {time.strftime('%H:%M:%S', time.localtime(wall))}"
                    f".{int(wall * 1000) % 1000:03d}  {text}" for mono, wall, text in self.events]


class Deliveries:
    """Every delivery seen by a consumer, in arrival order (one lock, one global order)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.log: list[tuple[float, bytes, str, bool]] = []  # (time, payload, consumer, dup)
        self.first: dict[bytes, float] = {}
        self.last_new = time.monotonic()

    def add(self, payload: bytes, consumer: str, dup: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self.log.append((now, payload, consumer, dup))
            if payload not in self.first:
                self.first[payload] = now
                self.last_new = now

    def seen(self) -> set[bytes]:
        with self._lock:
            return set(self.first)


class LiveNodes:
    """The MQTT ports of the nodes that are up (ready, not being stopped), for clients to pick from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ports: dict[str, int] = {}

    def up(self, node: str, port: int) -> None:
        with self._lock:
            self._ports[node] = port

    def down(self, node: str) -> None:
        with self._lock:
            self._ports.pop(node, None)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._ports)

    def pick(self, rng: random.Random, avoid: str | None = None) -> tuple[str, int] | None:
        nodes = self.snapshot()
        choices = sorted(n for n in nodes if n != avoid) or sorted(nodes)
        if not choices:
            return None
        node = rng.choice(choices)
        return node, nodes[node]


def _paho(client_id: str, clean_session: bool, manual_ack: bool = False) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                         manual_ack=manual_ack, reconnect_on_failure=False)
    return client


def _connect(client: paho.Client, port: int, timeout: float, keepalive: int = 10) -> bool:
    """Connect and wait for a successful CONNACK (False on any failure, the client stopped)."""
    connected = threading.Event()
    result: list[Any] = []

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        result.append(reason)
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect("127.0.0.1", port, keepalive=keepalive)
    except OSError:
        return False
    client.loop_start()
    if not connected.wait(timeout) or result[0].is_failure:
        _close(client)
        return False
    return True


def _close(client: paho.Client) -> None:
    """Disconnect and stop the client's network thread (whatever state its connection is in)."""
    for step in (client.disconnect, client.loop_stop):
        try:
            step()
        except Exception:  # noqa: BLE001, S110 - a broken connection may refuse either; both are best effort
            pass


# -- publishers ---------------------------------------------------------------------------------------------------

class Publisher(threading.Thread):
    """QoS 1 publisher with a window; moves to another node every ``move_every`` s and on a broken connection,
    and sends again whatever was not acknowledged."""

    def __init__(self, index: int, cfg: ChurnConfig, live: LiveNodes, timeline: Timeline,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"publisher-{index}")
        self.index = index
        self.name_ = f"p{index}"
        self.cfg = cfg
        self.live = live
        self.timeline = timeline
        self.stop_event = stop
        self.rng = random.Random(cfg.seed * 1000 + 100 + index)
        self.rate = cfg.rate / cfg.publishers
        self._lock = threading.Condition()
        #: seq -> (topic, payload) sent and not yet PUBACKed.
        self.unacked: dict[int, tuple[str, bytes]] = {}
        #: payload -> (monotonic time of its first PUBACK, node it was published on).
        self.acked: dict[bytes, tuple[float, str]] = {}
        self.ack_times: list[float] = []
        self.sent: set[bytes] = set()
        self.republished = 0
        self.connections = 0
        self.error: BaseException | None = None
        self._mids: dict[int, int] = {}  # mid -> seq, for the current client
        self._early: set[int] = set()  # mids PUBACKed before publish() returned them
        self._generation = 0
        self._broken = threading.Event()
        self.node: str | None = None

    def _make_client(self, generation: int) -> paho.Client:
        client = _paho(f"churn-pub-{self.index}", clean_session=True)
        client.max_inflight_messages_set(self.cfg.window)
        client.max_queued_messages_set(0)

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
            with self._lock:
                if generation != self._generation:
                    return
                seq = self._mids.pop(mid, None)
                if seq is None:
                    self._early.add(mid)
                    return
                self._acked(seq)

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            if generation == self._generation:
                self._broken.set()

        client.on_publish = on_publish
        client.on_disconnect = on_disconnect
        return client

    def _acked(self, seq: int) -> None:  # with self._lock held
        entry = self.unacked.pop(seq, None)
        if entry is None:
            return
        payload = entry[1]
        if payload not in self.acked:
            now = time.monotonic()
            self.acked[payload] = (now, self.node or "?")
            self.ack_times.append(now)
        self._lock.notify_all()

    def _send(self, client: paho.Client, seq: int, topic: str, payload: bytes) -> None:
        info = client.publish(topic, payload, qos=1)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self._acked(seq)
            else:
                self._mids[info.mid] = seq

    def _connect_somewhere(self, avoid: str | None, deadline: float) -> paho.Client | None:
        while time.monotonic() < deadline and not self.stop_event.is_set():
            choice = self.live.pick(self.rng, avoid)
            if choice is None:
                time.sleep(0.2)
                continue
            node, port = choice
            with self._lock:
                self._generation += 1
                generation = self._generation
                self._mids.clear()
                self._early.clear()
            self._broken.clear()
            client = self._make_client(generation)
            if _connect(client, port, timeout=5):
                self.node = node
                self.connections += 1
                self.timeline.note(f"{self.name_} connected to {node}")
                with self._lock:
                    again = sorted(self.unacked.items())
                for seq, (topic, payload) in again:  # at least once: what was not acknowledged goes again
                    self._send(client, seq, topic, payload)
                self.republished += len(again)
                return client
            avoid = node
            time.sleep(0.2)
        return None

    def run(self) -> None:
        cfg = self.cfg
        client = None
        try:
            client = self._connect_somewhere(None, time.monotonic() + 60)
            if client is None:
                raise RuntimeError(f"{self.name_}: no node to connect to")
            seq = 0
            started = time.monotonic()
            next_move = started + cfg.move_every * self.rng.uniform(0.7, 1.3)
            while not self.stop_event.is_set():
                now = time.monotonic()
                if self._broken.is_set() or now >= next_move:
                    why = "connection broke" if self._broken.is_set() else "moving"
                    old = self.node
                    _close(client)
                    self.timeline.note(f"{self.name_} leaves {old} ({why})")
                    client = self._connect_somewhere(old, time.monotonic() + 60)
                    if client is None:
                        raise RuntimeError(f"{self.name_}: no node to reconnect to within 60 s")
                    next_move = time.monotonic() + cfg.move_every * self.rng.uniform(0.7, 1.3)
                    continue
                # Pace: message ``seq`` is due at started + seq / rate.
                due = started + seq / self.rate
                if due > now:
                    self.stop_event.wait(min(due - now, 0.05))
                    continue
                with self._lock:
                    if len(self.unacked) >= cfg.window:
                        self._lock.wait(0.05)
                        continue
                    key = f"k{seq % cfg.keys:02d}"
                    topic = f"$queue/{cfg.queue}/{key}"
                    payload = f"{key}:{seq}:{self.name_}".encode()
                    self.unacked[seq] = (topic, payload)
                    self.sent.add(payload)
                self._send(client, seq, topic, payload)
                seq += 1
            # Publishing is over: wait (bounded) for what is in flight, moving on if the connection breaks.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with self._lock:
                    if not self.unacked:
                        break
                    self._lock.wait(0.1)
                if self._broken.is_set():
                    old = self.node
                    _close(client)
                    client = self._connect_somewhere(old, deadline)
                    if client is None:
                        break
            with self._lock:
                if self.unacked:
                    self.timeline.note(f"{self.name_}: {len(self.unacked)} message(s) never acknowledged")
        except BaseException as exc:  # noqa: BLE001 - reported in the result
            self.error = exc
            self.timeline.note(f"{self.name_} failed: {exc!r}")
        finally:
            if client is not None:
                _close(client)


# -- consumers ----------------------------------------------------------------------------------------------------

class Consumer(threading.Thread):
    """A persistent-session consumer with manual acks at a limited rate (``rate`` None: unlimited)."""

    def __init__(self, index: int, cfg: ChurnConfig, live: LiveNodes, timeline: Timeline, seen: Deliveries,
                 stop: threading.Event, topic: str | None = None, client_id: str | None = None,
                 first_node: str | None = None) -> None:
        super().__init__(daemon=True, name=f"consumer-{index}")
        self.index = index
        self.name_ = client_id or f"churn-c{index}"
        self.cfg = cfg
        self.live = live
        self.timeline = timeline
        self.seen = seen
        self.stop_event = stop
        self.topic = topic or f"$queue/{cfg.queue}"
        self.first_node = first_node
        self.rng = random.Random(cfg.seed * 1000 + 200 + index)
        self.rate: float | None = cfg.rate * cfg.consume_ratio / cfg.consumers
        self._inbox: queue_module.Queue[tuple[int, int, int]] = queue_module.Queue()
        self._generation = 0
        self._broken = threading.Event()
        self.node: str | None = None
        self.received = 0
        self.acks_sent = 0
        self.stale_acks_skipped = 0
        self.connections = 0
        self.error: BaseException | None = None
        self.subscribed = threading.Event()
        self.acked_before_drain = 0

    def unlimit(self) -> None:
        self.acked_before_drain = self.acks_sent
        self.rate = None

    def _connect_somewhere(self, avoid: str | None, deadline: float) -> paho.Client | None:
        first = self.first_node
        self.first_node = None
        while time.monotonic() < deadline and not self.stop_event.is_set():
            nodes = self.live.snapshot()
            if first is not None and first in nodes:
                choice: tuple[str, int] | None = (first, nodes[first])
            else:
                choice = self.live.pick(self.rng, avoid)
            first = None
            if choice is None:
                time.sleep(0.2)
                continue
            node, port = choice
            self._generation += 1
            generation = self._generation
            self._broken.clear()
            client = _paho(self.name_, clean_session=False, manual_ack=True)

            def on_message(c: Any, userdata: Any, msg: paho.MQTTMessage, generation: int = generation) -> None:
                self.received += 1
                self.seen.add(bytes(msg.payload), self.name_, bool(msg.dup))
                self._inbox.put((generation, msg.mid, msg.qos))

            def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any,
                              generation: int = generation) -> None:
                if generation == self._generation:
                    self._broken.set()

            suback = threading.Event()
            client.on_message = on_message
            client.on_disconnect = on_disconnect
            client.on_subscribe = lambda *args, suback=suback: suback.set()
            if _connect(client, port, timeout=5):
                client.subscribe(self.topic, qos=1)
                if suback.wait(5):
                    self.node = node
                    self.connections += 1
                    self.timeline.note(f"{self.name_} connected to {node}")
                    self.subscribed.set()
                    return client
                _close(client)
            avoid = node
            time.sleep(0.2)
        return None

    def run(self) -> None:
        client = None
        try:
            client = self._connect_somewhere(None, time.monotonic() + 60)
            if client is None:
                raise RuntimeError(f"{self.name_}: no node to connect to")
            tokens, last = 0.0, time.monotonic()
            while not self.stop_event.is_set():
                if self._broken.is_set():
                    old = self.node
                    _close(client)
                    self.timeline.note(f"{self.name_} lost {old}")
                    client = self._connect_somewhere(old, time.monotonic() + 60)
                    if client is None:
                        raise RuntimeError(f"{self.name_}: no node to reconnect to within 60 s")
                    continue
                rate = self.rate
                if rate is not None:
                    now = time.monotonic()
                    tokens = min(tokens + (now - last) * rate, max(rate * 0.2, 1.0))
                    last = now
                    if tokens < 1:
                        self.stop_event.wait(min((1 - tokens) / rate, 0.05))
                        continue
                try:
                    generation, mid, qos = self._inbox.get(timeout=0.05)
                except queue_module.Empty:
                    continue
                if generation != self._generation:
                    self.stale_acks_skipped += 1  # received on an earlier connection: its ack would mean nothing
                    continue
                if rate is not None:
                    tokens -= 1
                client.ack(mid, qos)
                self.acks_sent += 1
        except BaseException as exc:  # noqa: BLE001 - reported in the result
            self.error = exc
            self.timeline.note(f"{self.name_} failed: {exc!r}")
        finally:
            if client is not None:
                _close(client)


# -- the cluster --------------------------------------------------------------------------------------------------

class ChurnCluster(Cluster):
    """``Cluster`` whose nodes keep their gRPC port across restarts (a restarted node comes back where it was)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grpc_ports: dict[str, int] = {}
        self.lock = threading.RLock()
        self._fresh = 0

    def node_process(self, node_id: str, fresh_data: bool = False) -> BrokerProcess:
        with self.lock:
            existing = self.nodes.get(node_id)
            grpc_port = self.grpc_ports.setdefault(node_id, free_port())
            data_dir = existing.data_dir if existing else None
            if fresh_data:
                self._fresh += 1
                data_dir = self.workdir / node_id / f"data-{self._fresh}"
            node = BrokerProcess(self.workdir / node_id, [
                "--etcd", self.etcd.url, "--node-id", node_id, "--cluster", CLUSTER, "--config", str(self.config),
                "--grpc-listen", f"127.0.0.1:{grpc_port}", "--lease-ttl", str(self.lease_ttl),
                "--log-level", "debug", *self.args], port=existing.port if existing else None,
                data_dir=data_dir)
            if existing is not None:
                node._starts = existing._starts  # one numbering of starts in the appended log
            self.nodes[node_id] = node
            return node

    def start_node(self, node_id: str, deadline: float, fresh_data: bool = False) -> BrokerProcess:
        """Start (or restart) a node, trying again while it exits early (etcd down at its start, say)."""
        while True:
            node = self.node_process(node_id, fresh_data)
            fresh_data = False  # a retry keeps the directory just chosen
            try:
                node.start(timeout=max(deadline - time.monotonic(), 1.0))
                return node
            except RuntimeError:  # exited before it was ready
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)


def _write_config(cluster: Cluster, cfg: ChurnConfig) -> None:
    settings = {"partitions": cfg.partitions, **cfg.queue_settings}
    inner = ", ".join(f"{k}: {json.dumps(v)}" for k, v in settings.items())
    cluster.config.write_text(f"queues:\n  {cfg.queue}: {{{inner}}}\n")


def cluster_status(etcd: EtcdProcess) -> dict[str, Any] | None:
    try:
        result = subprocess.run([str(BIN_DIR / "broker"), "cluster", "status", "--etcd", etcd.url, "--json"],
                                capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


# -- faults -------------------------------------------------------------------------------------------------------

class Faults(threading.Thread):
    """The fault schedule: one fault every ``fault_every`` s, kinds in turn, targets picked by the seeded rng.
    Each fault's recovery (restart, stop of the extra node) runs in a thread of its own."""

    def __init__(self, cfg: ChurnConfig, cluster: ChurnCluster, etcd: EtcdProcess, live: LiveNodes,
                 timeline: Timeline, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="faults")
        self.cfg = cfg
        self.cluster = cluster
        self.etcd = etcd
        self.live = live
        self.timeline = timeline
        self.stop_event = stop
        self.rng = random.Random(cfg.seed * 1000 + 300)
        self.workers: list[threading.Thread] = []
        self.down: set[str] = set()  # base nodes down or on their way down/up
        self.kills: list[float] = []  # monotonic times of node SIGKILLs
        self.done: list[str] = []
        self.errors: list[str] = []
        self._etcd_down = False
        self._joined_busy = False
        self._lock = threading.Lock()
        #: Set when the scenario ends: pending restarts and joins are abandoned (no process starts after it).
        self.closed = threading.Event()

    def _pause(self, seconds: float) -> None:
        """A fault's own delay (the schedule's timing, not a readiness wait); ends early once closed."""
        if self.closed.wait(seconds):
            raise RuntimeError("scenario ended")

    def base_nodes(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.cfg.nodes)]

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        def guarded() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - reported in the result
                self.errors.append(f"{name}: {exc!r}")
                self.timeline.note(f"fault {name} failed: {exc!r}")
        worker = threading.Thread(target=guarded, daemon=True, name=name)
        self.workers.append(worker)
        worker.start()

    def run(self) -> None:
        cfg = self.cfg
        if not cfg.faults:
            return
        start = time.monotonic()
        for turn in range(10 ** 6):
            at = start + cfg.first_fault + turn * cfg.fault_every
            if self.stop_event.wait(max(at - time.monotonic(), 0)):
                return
            kind = cfg.faults[turn % len(cfg.faults)]
            try:
                getattr(self, f"_fault_{kind}")()
            except Exception as exc:  # reported in the result (a fault that cannot run fails the scenario)
                self.errors.append(f"fault {kind}: {exc!r}")
                self.timeline.note(f"fault {kind} failed: {exc!r}")
                return

    def _pick_node(self) -> str | None:
        with self._lock:
            up = [n for n in self.base_nodes() if n not in self.down]
            if len(up) < 2:
                return None  # never take the last node down
            node = self.rng.choice(up)
            self.down.add(node)
            return node

    def _restarted(self, node: str, why: str, fresh_data: bool = False) -> None:
        if self.closed.is_set():
            return
        process = self.cluster.start_node(node, time.monotonic() + 60, fresh_data=fresh_data)
        self.live.up(node, process.port)
        with self._lock:
            self.down.discard(node)
        self.timeline.note(f"fault: {node} up again ({why})")

    def _fault_kill(self, wipe: bool = False) -> None:
        node = self._pick_node()
        if node is None:
            self.timeline.note(f"fault {'wipe' if wipe else 'kill'} skipped: only one node up")
            return
        self.live.down(node)
        process = self.cluster.nodes[node]
        self.kills.append(self.timeline.note(f"fault: SIGKILL {node}" + (" and delete its data directory"
                                                                          if wipe else "")))
        process.kill()
        if wipe:
            shutil.rmtree(process.data_dir, ignore_errors=True)
        self.done.append(f"{'wipe' if wipe else 'kill'} {node}")

        def restart() -> None:
            self._pause(self.cfg.kill_restart_after)
            self._restarted(node, "on an empty data directory" if wipe else "after SIGKILL", fresh_data=wipe)
        self._spawn(restart, f"restart-{node}")

    def _fault_wipe(self) -> None:
        """SIGKILL a node and lose its disk: it comes back on an empty data directory (replicated queues only
        can keep what it held)."""
        self._fault_kill(wipe=True)

    def _fault_term(self) -> None:
        node = self._pick_node()
        if node is None:
            self.timeline.note("fault term skipped: only one node up")
            return
        self.live.down(node)
        self.timeline.note(f"fault: SIGTERM {node}")
        self.done.append(f"term {node}")

        def stop_and_restart() -> None:
            code = self.cluster.nodes[node].stop(timeout=60)
            self.timeline.note(f"fault: {node} exited with {code}")
            self._pause(self.cfg.term_restart_after)
            self._restarted(node, "after SIGTERM")
        self._spawn(stop_and_restart, f"term-{node}")

    def _fault_pause(self) -> None:
        node = self._pick_node()
        if node is None:
            self.timeline.note("fault pause skipped: only one node up")
            return
        process = self.cluster.nodes[node]
        assert process.proc is not None
        self.timeline.note(f"fault: SIGSTOP {node}")
        process.proc.send_signal(signal.SIGSTOP)
        self.done.append(f"pause {node}")

        def resume() -> None:
            try:
                self.closed.wait(self.cfg.pause_for if self.cfg.pause_for is not None else self.cfg.lease_ttl + 2)
            finally:
                if process.proc is not None and process.proc.poll() is None:
                    process.proc.send_signal(signal.SIGCONT)
                self.timeline.note(f"fault: SIGCONT {node}")
                with self._lock:
                    self.down.discard(node)
        self._spawn(resume, f"resume-{node}")

    def _fault_etcd(self) -> None:
        with self._lock:
            if self._etcd_down:
                return
            self._etcd_down = True
        self.timeline.note("fault: SIGKILL etcd")
        self.etcd.kill()
        self.done.append("kill etcd")

        def restart() -> None:
            self._pause(self.cfg.etcd_restart_after)
            self.etcd.start(timeout=30)
            with self._lock:
                self._etcd_down = False
            self.timeline.note("fault: etcd up again")
        self._spawn(restart, "restart-etcd")

    def _fault_join(self) -> None:
        node = f"n{self.cfg.nodes + 1}"
        with self._lock:
            if self._joined_busy:
                return
            self._joined_busy = True
        self.timeline.note(f"fault: {node} joins")
        self.done.append(f"join {node}")

        def join_then_stop() -> None:
            try:
                if self.closed.is_set():
                    return
                process = self.cluster.start_node(node, time.monotonic() + 60, fresh_data=self.cfg.join_fresh_data)
                self.live.up(node, process.port)
                self.timeline.note(f"fault: {node} ready")
                self._pause(self.cfg.join_stop_after)
                self.live.down(node)
                self.timeline.note(f"fault: SIGTERM {node}")
                code = process.stop(timeout=60)
                self.timeline.note(f"fault: {node} exited with {code}")
            finally:
                with self._lock:
                    self._joined_busy = False
        self._spawn(join_then_stop, f"join-{node}")

    def finish(self, timeout: float) -> None:
        """Wait (bounded) for every restart and stop the schedule started."""
        deadline = time.monotonic() + timeout
        self.join(max(deadline - time.monotonic(), 0.1))
        for worker in list(self.workers):
            worker.join(max(deadline - time.monotonic(), 0.1))
        alive = [w.name for w in self.workers if w.is_alive()]
        if alive:
            self.errors.append(f"fault workers still running after {timeout:.0f} s: {alive}")


# -- the result ---------------------------------------------------------------------------------------------------

@dataclass
class ChurnResult:
    seed: int
    config: dict[str, Any]
    sent: int = 0
    acked: int = 0
    delivered: int = 0  # deliveries of the main queue, duplicates included
    unique: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged, never delivered (main queue or DLQ)
    unpublished: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)  # payloads found in the DLQ
    dead_lettered_undelivered: int = 0  # of those, never delivered on the main queue
    duplicates: int = 0
    out_of_order: int = 0
    out_of_order_over_1s: int = 0  # of those, how many came more than 1 s after the later message
    out_of_order_max_lag: float = 0.0
    drain_seconds: float = 0.0
    drain_complete: bool = False
    recovery: list[float] = field(default_factory=list)  # per SIGKILL: longest gap between PUBACKs after it
    left_in_partitions: dict[str, int] = field(default_factory=dict)  # queue/partition -> messages (status)
    #: Nodes down at the end whose last run left messages on their disk (they come back only with the node).
    left_on_stopped_nodes: dict[str, str] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: dict[str, int] = field(default_factory=dict)  # broker log lines of interest, counted
    clients: dict[str, str] = field(default_factory=dict)  # per client: what it did
    lost_detail: list[str] = field(default_factory=list)
    late_detail: list[str] = field(default_factory=list)  # the longest-lagging out-of-order first deliveries
    timeline: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unpublished and not self.dead_lettered and not self.errors

    def summary(self) -> str:
        rec = ", ".join(f"{r:.1f}" for r in self.recovery) or "-"
        left = sum(self.left_in_partitions.values())
        return (f"seed {self.seed}: sent {self.sent}, acked {self.acked}, delivered {self.delivered} "
                f"({self.unique} unique, {self.duplicates} dup), lost {len(self.lost)}, "
                f"unpublished {len(self.unpublished)}, dlq {len(self.dead_lettered)} "
                f"({self.dead_lettered_undelivered} never delivered), left in partitions {left}, "
                f"out-of-order first deliveries {self.out_of_order} ({self.out_of_order_over_1s} by over 1 s, max lag "
                f"{self.out_of_order_max_lag:.1f} s), "
                f"drain {self.drain_seconds:.1f} s{'' if self.drain_complete else ' (incomplete)'}, "
                f"PUBACK gap after SIGKILL [{rec}] s, faults {len(self.faults)}, errors {len(self.errors)}")

    def report(self) -> str:
        lines = [self.summary(), f"workdir: {self.workdir}"]
        if self.errors:
            lines += ["errors:", *(f"  {e}" for e in self.errors)]
        if self.left_in_partitions:
            lines.append(f"left in partitions: {self.left_in_partitions}")
        if self.left_on_stopped_nodes:
            lines.append(f"left on the disk of stopped nodes: {self.left_on_stopped_nodes}")
        if self.clients:
            lines.append("clients: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.clients.items())))
        if self.warnings:
            lines.append("broker log counts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.warnings.items())))
        if self.lost_detail:
            lines += ["lost (first 20):", *(f"  {d}" for d in self.lost_detail[:20])]
        if self.dead_lettered:
            lines.append(f"dead-lettered (first 10): {self.dead_lettered[:10]}")
        if self.unpublished:
            lines.append(f"unpublished (first 10): {self.unpublished[:10]}")
        return "\n".join(lines)


#: Broker log lines counted in the result (pattern -> label).
LOG_PATTERNS = {
    "PUBACK for unknown pending message": "puback_unknown",
    "handoff of ": "handoff_failed",
    "handed over to": "handed_over",
    "lease lost": "lease_lost",
    "still alive after all": "lease_regained",
    "not acked in time": "ack_timeout",
    "left with": "consumer_left_requeued",
    "cannot move messages": "drain_failed",
    "Traceback": "traceback",
    "route stream to": "route_stream_broke",
    "leaving with": "left_with_partitions",
    "ERROR": "error_lines",
}


def _left_on_stopped_nodes(cluster: Cluster) -> dict[str, str]:
    """Nodes not running whose last run ended without handing everything over, and what their log says."""
    out = {}
    for name, node in cluster.nodes.items():
        if node.running:
            continue
        last = node.log.rpartition("==== start")[2]
        notes = [line.split(": ", 1)[-1] for line in last.splitlines()
                 if "cannot withdraw from the membership" in line or
                 ("leaving with" in line and "and 0 message(s)" not in line)]
        if notes:
            out[name] = "; ".join(notes)[:300]
    return out


def _count_logs(cluster: Cluster) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for node in cluster.nodes.values():
        for line in node.log.splitlines():
            for pattern, label in LOG_PATTERNS.items():
                if pattern in line:
                    counts[label] += 1
    return dict(counts)


def _out_of_order(deliveries: list[tuple[float, bytes, str, bool]],
                  worst_out: list[tuple[float, bytes, float]] | None = None) -> tuple[int, int, float]:
    """Per (publisher, key): first deliveries that came after the first delivery of a later message; the lag is
    how long after the earliest such later message. Returns (count, count with a lag over 1 s, largest lag).
    Competing consumers on separate connections reorder by milliseconds: only the long lags say much.
    ``worst_out`` (if given) receives (lag, payload, time of its first delivery) of those over 1 s."""
    per_key: dict[tuple[bytes, bytes], list[tuple[float, int]]] = defaultdict(list)
    seen: set[bytes] = set()
    for when, payload, _, _ in deliveries:
        if payload in seen:
            continue
        seen.add(payload)
        try:
            key, seq, pub = payload.split(b":")
            per_key[(pub, key)].append((when, int(seq)))
        except ValueError:
            continue
    count, over, worst = 0, 0, 0.0
    for (pub, key), firsts in per_key.items():
        prefix_max: list[int] = []
        best = -1
        for _, seq in firsts:
            best = max(best, seq)
            prefix_max.append(best)
        for i, (when, seq) in enumerate(firsts):
            if i and prefix_max[i - 1] > seq:
                count += 1
                j = bisect.bisect_right(prefix_max, seq)  # the first earlier delivery of a later message
                lag = when - firsts[j][0]
                over += lag > 1.0
                if worst_out is not None and lag > 1.0:
                    worst_out.append((lag, f"{key.decode()}:{seq}:{pub.decode()}".encode(), when))
                worst = max(worst, lag)
    return count, over, worst


def _recovery(ack_times: list[float], kills: list[float], horizon: float) -> list[float]:
    times = sorted(ack_times)
    out = []
    for kill in kills:
        i = bisect.bisect_left(times, kill)
        window = [kill] + [t for t in times[i:] if t <= kill + horizon]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        out.append(max(gaps) if gaps else horizon)
    return out


def _partition_of(key: str, partitions: int) -> int:
    from shoalmq._native import partition_of
    return partition_of(key.encode(), partitions)


# -- the scenario -------------------------------------------------------------------------------------------------

def run_churn(cfg: ChurnConfig, workdir: Path, log: Callable[[str], None] | None = None) -> ChurnResult:
    """Run one churn scenario in ``workdir`` (etcd and node data, logs) and return what the checker found.
    Every process started is stopped before it returns."""
    say = log or (lambda text: None)
    workdir.mkdir(parents=True, exist_ok=True)
    result = ChurnResult(seed=cfg.seed, config=dataclasses.asdict(cfg), workdir=str(workdir))
    timeline = Timeline()
    etcd = EtcdProcess(workdir / "etcd")
    cluster: ChurnCluster | None = None
    stop_publishing = threading.Event()
    stop_consuming = threading.Event()
    stop_faults = threading.Event()
    live = LiveNodes()
    seen = Deliveries()
    publishers: list[Publisher] = []
    consumers: list[Consumer] = []
    faults: Faults | None = None
    try:
        etcd.start(timeout=30)
        cluster = ChurnCluster(etcd, workdir / "cluster", queues={cfg.queue: cfg.partitions},
                               args=list(cfg.broker_args), lease_ttl=cfg.lease_ttl)
        _write_config(cluster, cfg)
        for i in range(cfg.nodes):
            node = cluster.start_node(f"n{i + 1}", time.monotonic() + 60)
            live.up(f"n{i + 1}", node.port)
        cluster.wait_settled(cfg.queue, cfg.partitions, timeout=60)
        timeline.note(f"{cfg.nodes} nodes settled")
        spread = cfg.consumer_nodes or cfg.nodes
        consumers = [Consumer(i, cfg, live, timeline, seen, stop_consuming, first_node=f"n{i % spread + 1}")
                     for i in range(cfg.consumers)]
        for consumer in consumers:
            consumer.start()
        for consumer in consumers:
            if not consumer.subscribed.wait(30):
                raise TimeoutError(f"{consumer.name_} did not subscribe within 30 s")
        publishers = [Publisher(i, cfg, live, timeline, stop_publishing) for i in range(cfg.publishers)]
        faults = Faults(cfg, cluster, etcd, live, timeline, stop_faults)
        timeline.note("publishing starts")
        for publisher in publishers:
            publisher.start()
        faults.start()
        say(f"seed {cfg.seed}: publishing for {cfg.duration:.0f} s at {cfg.rate:.0f} msgs/s")
        stop_publishing.wait(cfg.duration)
        stop_faults.set()
        stop_publishing.set()
        timeline.note("publishing stops")
        for publisher in publishers:
            publisher.join(90)
            if publisher.is_alive():
                result.errors.append(f"{publisher.name_} did not finish within 90 s")
        faults.finish(120)
        result.errors.extend(faults.errors)
        result.faults = faults.done
        # Every node up again: the drain, without a rate limit.
        timeline.note("drain starts")
        drain_started = time.monotonic()
        for consumer in consumers:
            consumer.unlimit()
        acked_all: set[bytes] = set()
        for publisher in publishers:
            acked_all.update(publisher.acked)
        deadline = drain_started + cfg.drain_timeout
        while time.monotonic() < deadline:
            if acked_all <= seen.seen():
                result.drain_complete = True
                break
            if time.monotonic() - max(seen.last_new, drain_started) >= cfg.quiet:
                break
            time.sleep(0.1)
        result.drain_seconds = time.monotonic() - drain_started
        timeline.note(f"drain ends after {result.drain_seconds:.1f} s "
                      f"({'complete' if result.drain_complete else 'quiet or timed out'})")
        stop_consuming.set()
        for consumer in consumers:
            consumer.join(30)
        # What is left in the partitions (stranded), by the nodes' own reports (written every 2 s when changed).
        time.sleep(2.5)  # a timed wait for a periodic writer: nodes report their load every 2 s (when changed)
        status = cluster_status(etcd)
        if status is not None:
            for name, info in status.get("partitions", {}).items():
                if name.startswith(cfg.queue + "/") and info.get("messages"):
                    result.left_in_partitions[name] = info["messages"]
        result.left_on_stopped_nodes = _left_on_stopped_nodes(cluster)
        # The dead-letter queue, drained by a consumer of its own.
        dlq_seen = Deliveries()
        dlq_stop = threading.Event()
        dlq = Consumer(99, cfg, live, timeline, dlq_seen, dlq_stop, topic=f"$queue/{cfg.queue}.dlq",
                       client_id="churn-dlq")
        dlq.unlimit()
        dlq.start()
        if dlq.subscribed.wait(30):
            dlq_started = time.monotonic()
            while time.monotonic() - max(dlq_seen.last_new, dlq_started) < 3 and time.monotonic() < dlq_started + 60:
                time.sleep(0.1)
        else:
            result.errors.append("the DLQ consumer did not subscribe")
        dlq_stop.set()
        dlq.join(30)
        # The checker.
        sent: set[bytes] = set()
        acked: dict[bytes, tuple[float, str]] = {}
        ack_times: list[float] = []
        for publisher in publishers:
            sent |= publisher.sent
            acked.update(publisher.acked)
            ack_times += publisher.ack_times
            if publisher.error is not None:
                result.errors.append(f"{publisher.name_}: {publisher.error!r}")
        for consumer in consumers:
            if consumer.error is not None:
                result.errors.append(f"{consumer.name_}: {consumer.error!r}")
            result.clients[consumer.name_] = (f"received {consumer.received}, acked {consumer.acks_sent} "
                                              f"({consumer.acked_before_drain} before the drain), "
                                              f"stale acks skipped {consumer.stale_acks_skipped}, "
                                              f"connections {consumer.connections}")
        for publisher in publishers:
            result.clients[publisher.name_] = (f"sent {len(publisher.sent)}, acked {len(publisher.acked)}, "
                                               f"sent again {publisher.republished}, "
                                               f"connections {publisher.connections}")
        delivered = seen.seen()
        in_dlq = dlq_seen.seen()
        result.sent, result.acked = len(sent), len(acked)
        result.delivered, result.unique = len(seen.log), len(delivered)
        result.duplicates = result.delivered - result.unique
        result.lost = sorted(p.decode() for p in set(acked) - delivered - in_dlq)
        result.unpublished = sorted(p.decode(errors="replace") for p in (delivered | in_dlq) - sent)
        result.dead_lettered = sorted(p.decode(errors="replace") for p in in_dlq)
        result.dead_lettered_undelivered = len(in_dlq - delivered)
        late: list[tuple[float, bytes, float]] = []
        result.out_of_order, result.out_of_order_over_1s, result.out_of_order_max_lag = _out_of_order(seen.log, late)
        t0 = timeline.t0
        for lag, payload, when in sorted(late, reverse=True)[:300]:
            key = payload.decode().split(":")[0]
            acked_at = acked.get(payload, (float("nan"), "?"))[0]
            result.late_detail.append(f"{payload.decode()} partition {_partition_of(key, cfg.partitions)}: lag "
                                      f"{lag:.1f} s, acked at {acked_at - t0:.2f}s, first delivered at "
                                      f"{when - t0:.2f}s")
        result.recovery = _recovery(ack_times, faults.kills, cfg.kill_restart_after + 10)
        for payload in result.lost:
            key = payload.split(":")[0]
            when, node = acked[payload.encode()]
            result.lost_detail.append(f"{payload} partition {_partition_of(key, cfg.partitions)}, acked at "
                                      f"{when - t0:.2f}s via {node}")
    except BaseException as exc:
        result.errors.append(f"scenario failed: {exc!r}")
        raise
    finally:
        for event in (stop_publishing, stop_faults, stop_consuming):
            event.set()
        if faults is not None:
            faults.closed.set()
            faults.join(10)
            for worker in faults.workers:
                worker.join(70)  # a start under way finishes (bounded by its own deadline), then it stops
        if cluster is not None:
            result.warnings = _count_logs(cluster)  # before the final stop, whose leaving is not under test
            with cluster.lock:
                cluster.stop()
        etcd.stop()
        etcd.remove_data()
        result.timeline = timeline.lines()
        (workdir / "timeline.txt").write_text("\n".join(result.timeline) + "\n")
        (workdir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ShoalMQ cluster churn scenario")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--lease-ttl", type=int, default=5)
    parser.add_argument("--faults", default="kill,term,etcd,join", help="comma-separated, in turn ('' for none)")
    parser.add_argument("--quiet", type=float, default=10)
    parser.add_argument("--consumer-nodes", type=int, default=None, help="consumers start on the first N nodes")
    parser.add_argument("--join-fresh-data", action="store_true", help="each join starts the extra node afresh")
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = ChurnConfig(seed=args.seed, duration=args.duration, rate=args.rate, nodes=args.nodes,
                      lease_ttl=args.lease_ttl, faults=tuple(f for f in args.faults.split(",") if f),
                      quiet=args.quiet, consumer_nodes=args.consumer_nodes, join_fresh_data=args.join_fresh_data)
    result = run_churn(cfg, args.workdir, log=print)
    print(result.report())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
