"""What reading a large node's state costs: ``python -m bench.scrape``.

One broker (fsync durability) with ``--queues`` queues (50) of ``--partitions`` partitions each (64), every
partition holding ``--per-partition`` ready messages (2) and one consumer per queue holding one message unacked.
Then ``--scrapes`` (20) sequential GETs of each of ``/metrics`` (what Prometheus reads), ``/v1/dashboard`` (what the
dashboard page polls every 1.5 s) and ``/v1/cluster/partitions``, timed from the request to the last byte, with
the broker's CPU seconds per request (from ``/proc/<pid>/stat``) and the response size. The numbers of series
and the depths of the first scrape are checked against what was published.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shoalmq._native import partition_of  # noqa: E402
from tests.ops_support import scrape  # noqa: E402
from tests.support import BrokerProcess, MqttClient, wait_until  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
ENDPOINTS = ("/metrics", "/v1/dashboard", "/v1/cluster/partitions")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def keys_per_partition(partitions: int, per_partition: int) -> list[str]:
    """Keys such that every partition gets ``per_partition`` of them (the key picks the partition)."""
    counts = [0] * partitions
    keys: list[str] = []
    k = 0
    while len(keys) < partitions * per_partition:
        key = f"k{k}"
        k += 1
        p = partition_of(key.encode(), partitions)
        if counts[p] < per_partition:
            counts[p] += 1
            keys.append(key)
    return keys


def total(samples: dict, name: str) -> float:
    """A sample summed over all its label sets."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def timed_get(url: str, pid: int) -> tuple[float, float, int]:
    cpu, start = cpu_seconds(pid), time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - start, cpu_seconds(pid) - cpu, len(body)


def main() -> int:
    parser = argparse.ArgumentParser(prog="scrape", description=__doc__.splitlines()[0])
    parser.add_argument("--queues", type=int, default=50)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--per-partition", type=int, default=2)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoalmq-scrape-") as tmp:
        work = Path(tmp)
        config = work / "shoalmq.yaml"
        config.write_text(f"queue_defaults:\n  partitions: {args.partitions}\n")
        broker = BrokerProcess(work, ["--config", str(config), "--log-level", "warning", "--consumer-window", "1"])
        broker.start(timeout=60)
        try:
            keys = keys_per_partition(args.partitions, args.per_partition)
            publisher = MqttClient(broker.port, "scrape-pub", timeout=60).connect()
            started = time.perf_counter()
            for q in range(args.queues):
                infos = [publisher.client.publish(f"$queue/q{q}/{key}", b"x" * 100, qos=1) for key in keys]
                for info in infos:
                    info.wait_for_publish(60)
            published = args.queues * len(keys)
            print(f"{published:,} messages published to {args.queues} queues x {args.partitions} partitions in "
                  f"{time.perf_counter() - started:.1f} s")
            consumers = []
            for q in range(args.queues):  # one consumer per queue, holding one message (its window: 1 here)
                consumer = MqttClient(broker.port, f"scrape-con-{q}", manual_ack=True, timeout=60).connect()
                consumer.subscribe(f"$queue/q{q}")
                consumers.append(consumer)
            # Wait until the first scrape shows every message: ready + unacked = published.
            url = broker.http
            wait_until(lambda: total(scrape(url), "shoalmq_queue_messages_ready")
                       + total(scrape(url), "shoalmq_queue_messages_unacked") == published, 60,
                       "every message counted ready or unacked")
            samples = scrape(url)
            print(f"/metrics: {len(samples):,} samples; ready {total(samples, 'shoalmq_queue_messages_ready'):,.0f}, "
                  f"unacked {total(samples, 'shoalmq_queue_messages_unacked'):,.0f}")
            print(f"\n{args.scrapes} sequential requests each")
            print("| endpoint | median ms | max ms | broker CPU ms / request | bytes |")
            print("| --- | --- | --- | --- | --- |")
            for path in ENDPOINTS:
                runs = [timed_get(url + path, broker.pid) for _ in range(args.scrapes)]
                print(f"| `{path}` | {statistics.median(r[0] for r in runs) * 1000:.1f} | "
                      f"{max(r[0] for r in runs) * 1000:.1f} | {statistics.median(r[1] for r in runs) * 1000:.0f} | "
                      f"{runs[-1][2]:,} |")
            for client in [publisher, *consumers]:
                client.client.disconnect()
                client.client.loop_stop()
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
