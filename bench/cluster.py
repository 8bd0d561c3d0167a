"""Cluster figures, in one run: ``python -m bench.cluster``.

1. **Local vs forwarded.** Two nodes, a queue of one partition. The load tool publishes to and consumes from the
   partition's owner (nothing crosses nodes), then the other node (every publish is forwarded to the owner with
   ``EnqueueRemote``, every delivery proxied back with ``RouteQueueMessage``). Reports throughput and the CPU
   seconds per 100,000 messages of both broker processes together.
2. **One node vs three.** Three load tools at once, each with its own queue (6 partitions) and one publisher and
   one consumer: all on one node, then each on a node of three (a queue's partitions are spread over the three
   nodes, so two thirds of each tool's messages are forwarded and proxied).
3. **Takeover.** SIGKILL a node of three; a publish (through a survivor) to a key of one of its partitions is
   timed from the kill to its PUBACK. The target is the lease TTL + 1 s.

Every broker runs with fsync durability, real etcd (Debian's), on this machine's loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shoalmq._native import partition_of  # noqa: E402
from tests.cluster_support import Cluster  # noqa: E402
from tests.support import EtcdProcess, MqttClient  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def load(port: int, messages: int, clients: int, work: Path, tag: str) -> dict[str, Any]:
    out = work / f"{tag}.json"
    subprocess.run([sys.executable, "-m", "bench.loadtool", "--port", str(port), "--messages", str(messages),
                    "--publishers", str(clients), "--consumers", str(clients), "--topic", "$queue/load",
                    "--client-prefix", tag, "--json", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def start_cluster(work: Path, nodes: list[str], partitions: int,
                  queues: tuple[str, ...] = ("load",)) -> tuple[EtcdProcess, Cluster]:
    etcd = EtcdProcess(work / "etcd")
    etcd.start()
    cluster = Cluster(etcd, work / "cluster", queues={q: partitions for q in queues},
                      args=["--log-level", "warning"])
    try:
        for node in nodes:
            cluster.add(node)
        for queue in queues:
            cluster.wait_settled(queue, partitions)
    except BaseException:
        stop(etcd, cluster)  # no broker or etcd left running behind a failed start
        raise
    return etcd, cluster


def stop(etcd: EtcdProcess, cluster: Cluster) -> None:
    cluster.stop()
    etcd.stop()


def local_vs_forwarded(work: Path, messages: int) -> list[dict[str, Any]]:
    rows = []
    etcd, cluster = start_cluster(work, ["n1", "n2"], 1)
    try:
        owner = cluster.owners("load")[0]
        other = "n2" if owner == "n1" else "n1"
        pids = [node.pid for node in cluster.nodes.values()]
        for label, node in (("local (publish and consume on the owner)", owner),
                            ("forwarded + proxied (publish and consume on the other node)", other)):
            before = sum(cpu_seconds(pid) for pid in pids)
            result = load(cluster.nodes[node].port, messages, 1, work, f"fw-{node}")
            cpu = sum(cpu_seconds(pid) for pid in pids) - before
            rows.append({"case": label, "msgs_per_s": result["delivered_per_s"], "lost": result["lost"],
                         "duplicates": result["duplicates"], "p99_ms": result.get("latency_p99_ms"),
                         "cpu_s_per_100k": cpu / result["delivered"] * 100_000 if result["delivered"] else None})
    finally:
        stop(etcd, cluster)
    return rows


def one_vs_three(work: Path, messages: int) -> list[dict[str, Any]]:
    rows = []
    for names in (["n1"], ["n1", "n2", "n3"]):
        etcd, cluster = start_cluster(work / f"scale{len(names)}", names, 6, ("load1", "load2", "load3"))
        try:
            pids = [node.pid for node in cluster.nodes.values()]
            before = sum(cpu_seconds(pid) for pid in pids)
            share = messages // 3
            procs = []
            started = time.monotonic()
            for index in range(3):
                name = names[index % len(names)]
                out = work / f"scale-{len(names)}-{index}.json"
                procs.append((out, subprocess.Popen(
                    [sys.executable, "-m", "bench.loadtool", "--port", str(cluster.nodes[name].port),
                     "--messages", str(share), "--publishers", "1", "--consumers", "1",
                     "--topic", f"$queue/load{index + 1}", "--client-prefix", f"s{len(names)}-{index}",
                     "--json", str(out)],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            for _, proc in procs:
                proc.wait(600)
            elapsed = time.monotonic() - started
            results = [json.loads(out.read_text()) for out, _ in procs]
            delivered = sum(r["delivered"] for r in results)
            cpu = sum(cpu_seconds(pid) for pid in pids) - before
            rows.append({"nodes": len(names), "msgs_per_s": sum(r["delivered_per_s"] or 0 for r in results),
                         "wall_msgs_per_s": delivered / elapsed, "lost": sum(r["lost"] for r in results),
                         "duplicates": sum(r["duplicates"] for r in results),
                         "cpu_s_per_100k": cpu / delivered * 100_000 if delivered else None})
        finally:
            stop(etcd, cluster)
    return rows


def takeover(work: Path, rounds: int, ttl: int) -> list[float]:
    times = []
    for attempt in range(rounds):
        etcd, cluster = start_cluster(work / f"takeover{attempt}", ["n1", "n2", "n3"], 6)
        cluster.lease_ttl = ttl
        try:
            owners = cluster.owners("load")
            victim_partition = next(p for p, node in owners.items() if node == "n3")
            key = next(f"k{i}" for i in range(10_000) if partition_of(f"k{i}".encode(), 6) == victim_partition)
            client = MqttClient(cluster.nodes["n1"].port, timeout=60).connect()
            client.publish(f"$queue/load/{key}", b"warm")
            killed = time.monotonic()
            cluster.nodes["n3"].kill()
            client.publish(f"$queue/load/{key}", b"after the kill")
            times.append(time.monotonic() - killed)
            client.disconnect()
        finally:
            stop(etcd, cluster)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoalmq-bench-") as tmp:
        work = Path(tmp)
        forwarded = [local_vs_forwarded(work / f"fw{i}", args.messages) for i in range(args.rounds)]
        print("\n1. local vs forwarded, 1 publisher / 1 consumer, 100 B, fsync (median of rounds)")
        for index in range(2):
            case = [r[index] for r in forwarded]
            print(f"  {case[0]['case']}: {statistics.median(r['msgs_per_s'] for r in case):,.0f} msgs/s, "
                  f"CPU {statistics.median(r['cpu_s_per_100k'] for r in case):.2f} s per 100k (both nodes), "
                  f"lost {sum(r['lost'] for r in case)}, duplicates {sum(r['duplicates'] for r in case)}")
        ratios = [r[1]["cpu_s_per_100k"] / r[0]["cpu_s_per_100k"] for r in forwarded]
        print(f"  forwarded / local CPU per message: {statistics.median(ratios):.2f}x "
              f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        scale = [one_vs_three(work / f"sc{i}", args.messages) for i in range(args.rounds)]
        print("\n2. one node vs three (same total load; one load tool per node)")
        for index in range(2):
            case = [r[index] for r in scale]
            print(f"  {case[0]['nodes']} node(s): {statistics.median(r['wall_msgs_per_s'] for r in case):,.0f} "
                  f"msgs/s, CPU {statistics.median(r['cpu_s_per_100k'] for r in case):.2f} s per 100k, "
                  f"lost {sum(r['lost'] for r in case)}, duplicates {sum(r['duplicates'] for r in case)}")
        ttl = 3
        times = takeover(work, args.rounds, ttl)
        print(f"\n3. takeover after SIGKILL (lease TTL {ttl} s, target {ttl + 1} s): "
              f"{', '.join(f'{t:.2f}' for t in times)} s (median {statistics.median(times):.2f} s)")


if __name__ == "__main__":
    main()
