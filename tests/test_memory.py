"""Memory bounded by bytes: a backlog larger than the rings' byte budget waits on disk, not in the broker's RAM.

A real broker process, no consumer while 2,000 messages of 256 KiB (500 MiB) are published; its resident memory
is sampled throughout. Then one consumer reads every message back and checks each one.

What is measured is ``RssAnon`` in ``/proc/<pid>/status``: the process's anonymous memory (its heap, the Python
objects, malloc'd buffers). The LMDB file is memory-mapped, and its pages, once written or read, count in
``VmRSS`` too, as ``RssFile``: but they are page cache, shared with the kernel's and reclaimable at any time (they
would be there for a file written with ``write()`` as well), so they are not what the budget bounds. Before the
byte budget, the rings held every one of those payloads: ``RssAnon`` grew by the whole backlog.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest

from tests.conftest import BrokerFactory
from tests.support import MqttClient

MESSAGES = 2000
PAYLOAD = 256 * 1024
KEYS = 16  # messages are keyed: each key's messages keep their order (a key stays on one partition)
BUDGET = 32 << 20  # --memory-budget: less than 8 partitions x --ring-bytes (8 MiB), so it is what binds
PUBLISH_WINDOW = 20  # QoS 1 publishes in flight at a time (paho's default max_inflight)
# What else is resident while the backlog is written, besides the rings (at most BUDGET):
# - the publishes waiting for their commit: at most PUBLISH_WINDOW x 256 KiB = 5 MiB, twice over while a commit
#   runs (the payloads, and the segment value packed from them) and once more as LMDB's dirty pages: ~15 MiB;
# - the connection's read buffer (a frame is read whole: 256 KiB and a little) and the commit's other buffers;
# - what the allocator keeps of freed 256 KiB blocks instead of giving it back (measured: a few MiB).
# 48 MiB covers these with room to spare and is a tenth of the backlog: without the byte budget, RssAnon grows
# by ~500 MiB here.
MARGIN = 48 << 20


def rss_kib(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                values[name] = int(rest.split()[0])
    return values


class RssSampler:
    """The peak RssAnon (and RssFile) of a process, sampled every 20 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_anon = self.peak_file = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            values = rss_kib(self.pid)
            self.peak_anon = max(self.peak_anon, values["RssAnon"] << 10)
            self.peak_file = max(self.peak_file, values["RssFile"] << 10)
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def payload_of(seq: int) -> bytes:
    """Message ``seq``: its number, the SHA-256 of its body, and a body of pseudo-random bytes (seeded by seq)."""
    body = random.Random(seq).randbytes(PAYLOAD - 36)
    return seq.to_bytes(4, "big") + hashlib.sha256(body).digest() + body


def check_payload(payload: bytes) -> int:
    """The message's number, after checking its length and body against the digest it carries."""
    assert len(payload) == PAYLOAD
    assert hashlib.sha256(payload[36:]).digest() == payload[4:36], "payload corrupted"
    return int.from_bytes(payload[:4], "big")


def publish_all(client: MqttClient, topic_of: Callable[[int], str]) -> None:
    """Publish every message at QoS 1 with PUBLISH_WINDOW in flight, each generated when sent."""
    paho_client = client.client
    pending: list[paho.MQTTMessageInfo] = []
    for seq in range(MESSAGES):
        pending.append(paho_client.publish(topic_of(seq), payload_of(seq), qos=1))
        while len(pending) >= PUBLISH_WINDOW:
            pending.pop(0).wait_for_publish(30)
    for info in pending:
        info.wait_for_publish(30)
    assert all(info.is_published() for info in pending)


@pytest.mark.timeout(120)
def test_a_backlog_larger_than_the_budget_waits_on_disk_and_is_consumed_in_order(
        broker_factory: BrokerFactory, mqtt_client: Callable[..., MqttClient]) -> None:
    broker = broker_factory(["--memory-budget", str(BUDGET), "--log-level", "warning"])
    publisher = mqtt_client(broker.port)
    # Warm up first (the queue, its partitions, the paths a publish and a delivery take), then measure idle.
    publisher.publish("$queue/warmup", payload_of(0))
    warm = mqtt_client(broker.port)
    warm.subscribe("$queue/warmup")
    check_payload(warm.expect(1)[0].payload)
    warm.disconnect()
    time.sleep(0.3)
    idle = rss_kib(broker.pid)["RssAnon"] << 10

    started = time.monotonic()
    with RssSampler(broker.pid) as publishing:
        publish_all(publisher, lambda seq: f"$queue/big/k{seq % KEYS}")
        time.sleep(0.5)  # the last commits' effects on memory, if any
    publish_seconds = time.monotonic() - started
    after_publish = rss_kib(broker.pid)
    print(f"\nidle RssAnon {idle >> 20} MiB; publishing {MESSAGES} x {PAYLOAD >> 10} KiB took {publish_seconds:.1f} s, "
          f"peak RssAnon {publishing.peak_anon >> 20} MiB (+{(publishing.peak_anon - idle) >> 20} MiB, "
          f"{publishing.samples} samples), peak RssFile {publishing.peak_file >> 20} MiB; "
          f"after: RssAnon {after_publish['RssAnon'] >> 10} MiB")
    assert publishing.peak_anon - idle < BUDGET + MARGIN, (
        f"RssAnon grew by {(publishing.peak_anon - idle) >> 20} MiB with a {BUDGET >> 20} MiB budget")

    # Consume everything: each message once, intact, and each key's messages in the order they were published.
    consumer = MqttClient(broker.port, timeout=60)
    consumer.connect()
    try:
        with RssSampler(broker.pid) as consuming:
            started = time.monotonic()
            consumer.subscribe("$queue/big")
            last_seq: dict[str, int] = {}
            seen: set[int] = set()
            for _ in range(MESSAGES):  # checked as they come (not all 500 MiB kept in this process)
                message = consumer.messages.get(timeout=30)
                seq = check_payload(message.payload)
                key = message.topic.rpartition("/")[2]
                assert key == f"k{seq % KEYS}", (message.topic, seq)
                assert last_seq.get(key, -1) < seq, f"{key}: {seq} after {last_seq[key]}"
                last_seq[key] = seq
                seen.add(seq)
            consume_seconds = time.monotonic() - started
        assert seen == set(range(MESSAGES))
        assert consumer.no_message(0.3), "a message was delivered twice"
        time.sleep(1.5)  # the store gives freed memory back a second after its rings drained
        drained = rss_kib(broker.pid)["RssAnon"] << 10
        print(f"consuming took {consume_seconds:.1f} s, peak RssAnon {consuming.peak_anon >> 20} MiB "
              f"(+{(consuming.peak_anon - idle) >> 20} MiB); drained: RssAnon {drained >> 20} MiB")
        # While consuming, the rings are refilled within the budget, and one consumer's window of messages
        # (128 x 256 KiB = 32 MiB) is in flight, up to three times over: the payloads held until acked, the
        # PUBLISH frames encoded from them, and what the socket has not taken yet.
        window = 128 * PAYLOAD
        assert consuming.peak_anon - idle < BUDGET + 3 * window + MARGIN
    finally:
        consumer.disconnect()
    assert broker.running
