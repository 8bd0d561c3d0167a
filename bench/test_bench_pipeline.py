"""The Python work of one `$queue/` message on a single node, without sockets or syncs.

One publisher's window of 64 messages at a time (100 B, no key, 8 partitions) goes the fast path's way through the
queue manager: ``publish_many``, the group commit, dispatch to one consumer (window 128) whose ``deliver`` encodes
the batch from the stored records as QoS 1 PUBLISH frames, and that consumer's acks as one batch, until the queue
is empty again. The store is the in-memory backend, so what is measured is the broker's own per-message work:
what the LMDB commit, the socket reads and writes and the event loop add on top is measured end to end by
``python -m bench.compare``. Rounds are 100 windows (6,400 messages) on uvloop.
"""

from __future__ import annotations

import asyncio

import uvloop

from shoalmq._native import mqtt_codec
from shoalmq.queue.config import QueueConfig
from shoalmq.queue.manager import Delivery, QueueManager
from shoalmq.queue.storage import MemoryBackend, Store

WINDOW = 64
WINDOWS = 100
PAYLOAD = b"x" * 100


class Consumer:
    """Encodes its deliveries as a consumer connection would, and acks each batch it is handed."""

    window = 128

    def __init__(self) -> None:
        self.batches: list[list[Delivery]] = []
        self.received = 0
        self.next_id = 0

    def deliver(self, deliveries: list[Delivery]) -> None:
        ids = []
        for delivery in deliveries:
            self.next_id = self.next_id % 65535 + 1
            delivery.packet_id = self.next_id
            ids.append(self.next_id)
        mqtt_codec.encode_records(deliveries[0].queue.topic_prefix, [d.message.payload for d in deliveries], ids)
        self.batches.append(deliveries)
        self.received += len(deliveries)

    def revoke(self, deliveries: list[Delivery]) -> None:
        pass


def test_python_work_per_message(benchmark) -> None:
    async def rounds(count: int) -> None:
        manager = QueueManager(Store(MemoryBackend()), defaults=QueueConfig(partitions=8))
        consumer = Consumer()
        manager.subscribe(consumer, "bench")
        payloads = [PAYLOAD] * WINDOW
        for _ in range(count):
            for _ in range(WINDOWS):
                target = consumer.received + WINDOW
                await manager.publish_many("$queue/bench", payloads)
                while consumer.received < target:
                    await asyncio.sleep(0)
                batches, consumer.batches = consumer.batches, []
                for batch in batches:
                    manager.ack(batch)
        await manager.store.flush()
        assert manager.queue("bench").depth == 0
        manager.close()

    def workload() -> None:
        uvloop.run(rounds(1))

    benchmark.pedantic(workload, rounds=7, warmup_rounds=1)
    per_message_us = benchmark.stats.stats.median / (WINDOW * WINDOWS) * 1e6
    benchmark.extra_info["median_us_per_message"] = round(per_message_us, 2)
    print(f"\nqueue pipeline: {per_message_us:.2f} µs of Python per message (median of rounds)")
