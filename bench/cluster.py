"""Cluster figures, in one run: ``python -m bench.cluster``.

1. **Local vs forwarded** (step ``forwarded``). Two nodes, a queue of one partition. The load tool publishes to and
   consumes from the partition's owner (nothing crosses nodes), then the other node (every publish is forwarded to
   the owner with ``EnqueueRemote``, every delivery proxied back with ``RouteQueueMessage``). Reports throughput
   and the CPU seconds per 100,000 messages of both broker processes together.
2. **One node vs three** (step ``scale``). Three load tools at once, each with its own queue (6 partitions) and
   one publisher and one consumer: all on one node, then each on a node of three (a queue's partitions are spread
   over the three nodes, so two thirds of each tool's messages are forwarded and proxied), then the same on three
   nodes with every queue replicated (``replication_factor: 3``: each partition's leader copies every message to
   two followers before it acknowledges it). Per row: throughput, CPU per 100,000 messages summed over all the
   brokers, the ratio to the one-node row, and the stream messages of each kind (from the nodes' load reports,
   ``grpc_stream_messages``) per queue message delivered, with the gRPC messages (link frames) that carried them.
3. **Takeover** (step ``takeover``). SIGKILL a node of three; a publish (through a survivor) to a key of one of its
   partitions is timed from the kill to its PUBACK. The target is the lease TTL + 1 s (replication factor 1: the
   partition waits for the dead owner's lease; ``python -m bench.replication`` measures the replicated failover).

Every broker runs with fsync durability, real etcd (Debian's), on this machine's loopback. ``--steps`` runs only
some of the steps (e.g. ``--steps scale,takeover``); ``--window`` sets the publishers' window of the scale step (64).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shoalmq._native import partition_of  # noqa: E402
from shoalmq.cluster.assignment import HashPartitionAssigner  # noqa: E402
from tests.cluster_support import Cluster  # noqa: E402
from tests.support import EtcdProcess, MqttClient, wait_until  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
STEPS = ("forwarded", "scale", "takeover")
#: The kinds of gRPC stream messages counted by the nodes (``shoalmq.cluster.stats``), in hop order.
KINDS = ("enqueue", "enqueue_ack", "route_deliveries", "route_acks", "route_nacks", "route_returns", "replicate",
         "replicate_heartbeat", "replicate_progress", "link_frame")
#: Seconds after the load before the load reports are read: a node rewrites its report at most every 2 s, from a
#: reconcile (at least every 1 s), so a count that stopped changing is in etcd 3 s later at the latest.
REPORT_SETTLE = 3.5


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


def interrupt_on_signals() -> None:
    """Make SIGTERM and SIGINT raise KeyboardInterrupt (SIGINT too when the run was started in the background,
    where a shell ignores it), so that every step's ``finally`` stops the brokers, etcd and load tools it started."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and its children (the load tool's workers), if
    it is still running."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def write_config(cluster: Cluster, queues: dict[str, int], replication: int) -> None:
    """Declare the queues with an explicit replication factor (a queue whose settings give none gets the
    cluster's default, which need not be 1)."""
    lines = ["queues:"] + [f"  {name}: {{partitions: {count}, replication_factor: {replication}}}"
                           for name, count in queues.items()]
    cluster.config.write_text("\n".join(lines) + "\n")


def records(cluster: Cluster, queue: str) -> dict[int, dict[str, Any]]:
    return {int(key.rpartition("/")[2]): value for key, value in cluster.keys("partitions/").items()
            if key.rpartition("/")[0] == queue}


def wait_in_sync(cluster: Cluster, queues: tuple[str, ...], partitions: int, nodes: set[str],
                 timeout: float = 60) -> dict[str, dict[int, dict[str, Any]]]:
    """Every partition of every queue has a replicated record whose in-sync set is all of ``nodes``, led by the
    node the (default, hash) assigner prefers: a replicated partition's leadership moves there a few seconds after
    the nodes join or come back, and such a move should not fall inside a measurement. Returns the records."""
    assigner = HashPartitionAssigner()
    ordered = sorted(nodes)

    def settled() -> dict[str, dict[int, dict[str, Any]]] | None:
        out = {}
        for queue in queues:
            found = records(cluster, queue)
            if len(found) != partitions or any(
                    set(r.get("isr", ())) != nodes or r.get("leader") != assigner.owner(queue, p, ordered)
                    for p, r in found.items()):
                return None
            out[queue] = found
        return out
    return wait_until(settled, timeout, f"every partition of {', '.join(queues)} in sync on {ordered}, led by "
                      "its preferred node", 0.1)


def start_cluster(work: Path, nodes: list[str], partitions: int, queues: tuple[str, ...] = ("load",),
                  replication: int = 1) -> tuple[EtcdProcess, Cluster]:
    etcd = EtcdProcess(work / "etcd")
    etcd.start()
    cluster = Cluster(etcd, work / "cluster", args=["--log-level", "warning"])
    try:
        write_config(cluster, {q: partitions for q in queues}, replication)
        for node in nodes:
            cluster.add(node)
        for queue in queues:
            cluster.wait_settled(queue, partitions, timeout=60)
        if replication > 1:
            wait_in_sync(cluster, queues, partitions, set(nodes))
    except BaseException:
        stop(etcd, cluster)  # no broker or etcd left running behind a failed start
        raise
    return etcd, cluster


def stop(etcd: EtcdProcess, cluster: Cluster) -> None:
    """Stop every node and etcd, then print what the nodes' logs say that is not routine (ERROR lines, and the
    WARNINGs counted by their text)."""
    try:
        cluster.stop()
    finally:
        etcd.stop()
        etcd.remove_data()
    name = cluster.workdir.parent.name
    for node, lines in log_errors(cluster).items():
        print(f"    [{name}] {node}: {len(lines)} ERROR line(s) in broker.log, first: {lines[0][:200]}")
    for node, counter in node_warnings(cluster).items():
        top = sorted(counter.items(), key=lambda kv: -kv[1])[:3]
        print(f"    [{name}] {node} warnings: " + "; ".join(f"{n}x {text}" for text, n in top))


def log_errors(cluster: Cluster) -> dict[str, list[str]]:
    """Each node's ERROR and CRITICAL lines (and tracebacks) from its broker.log, all restarts included."""
    out = {}
    for name, node in cluster.nodes.items():
        lines = [line for line in node.log.splitlines()
                 if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]
        if lines:
            out[name] = lines
    return out


def node_warnings(cluster: Cluster) -> dict[str, collections.Counter[str]]:
    """Each node's WARNING lines, counted by their text with the numbers taken out."""
    out: dict[str, collections.Counter[str]] = {}
    for name, node in cluster.nodes.items():
        counter: collections.Counter[str] = collections.Counter()
        for line in node.log.splitlines():
            if " WARNING " in line:
                text = line.split(" WARNING ", 1)[1]
                counter[re.sub(r"\d+(\.\d+)?", "#", text)[:140]] += 1
        if counter:
            out[name] = counter
    return out


class ReportWatcher:
    """Polls the nodes' load reports (``/<cluster>/load/<node>``) from a thread and keeps every version of each
    node's ``grpc_stream_messages`` with the time it was first seen, so that counts can be taken as of a moment."""

    def __init__(self, cluster: Cluster, interval: float = 0.1) -> None:
        self.cluster = cluster
        self.interval = interval
        self.seen: dict[str, list[tuple[float, dict[str, list[int]]]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reports = self.cluster.keys("load/")
            except Exception:  # noqa: BLE001 (etcd3gw raises requests' errors and its own: try again)
                reports = {}
            now = time.monotonic()
            for node, report in reports.items():
                counts = report.get("grpc_stream_messages", {})
                versions = self.seen.setdefault(node, [])
                if not versions or versions[-1][1] != counts:
                    versions.append((now, counts))
            self._stop.wait(self.interval)

    def wait_reports(self, nodes: list[str], versions: int = 1, since: float = 0.0, timeout: float = 15) -> None:
        """Wait until ``versions`` reports of each node were seen (at or after ``since``)."""
        wait_until(lambda: all(sum(1 for seen, _ in self.seen.get(n, ()) if seen >= since) >= versions
                               for n in nodes), timeout, f"{versions} load report(s) from each of {nodes}", 0.05)

    def at(self, moment: float) -> dict[str, tuple[float, dict[str, list[int]]]]:
        """Each node's last report seen at or before ``moment`` (with when it was seen)."""
        out = {}
        for node, versions in self.seen.items():
            before = [v for v in versions if v[0] <= moment]
            out[node] = before[-1] if before else (moment, {})
        return out


def diff_counts(before: dict[str, tuple[float, dict[str, list[int]]]],
                after: dict[str, tuple[float, dict[str, list[int]]]]) -> dict[str, list[int]]:
    """kind -> [stream messages, queue messages carried], summed over the nodes, between two snapshots."""
    total: dict[str, list[int]] = {}
    for node, (_, counts) in after.items():
        old = before.get(node, (0.0, {}))[1]
        for kind, (messages, items) in counts.items():
            m0, i0 = old.get(kind, [0, 0])
            entry = total.setdefault(kind, [0, 0])
            entry[0] += messages - m0
            entry[1] += items - i0
    return total


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


def one_vs_three(work: Path, messages: int, window: int = 64) -> list[dict[str, Any]]:
    rows = []
    for label, names, replication in (("1 node", ["n1"], 1), ("3 nodes, R=1", ["n1", "n2", "n3"], 1),
                                      ("3 nodes, R=3", ["n1", "n2", "n3"], 3)):
        queues = ("load1", "load2", "load3")
        etcd, cluster = start_cluster(work / f"scale{len(names)}r{replication}", names, 6, queues, replication)
        try:
            with ReportWatcher(cluster) as watcher:
                # What the start-up sent (records, subscribes, handoffs) is in the reports once they settle; a
                # replicated node's next two reports give what it sends while idle (heartbeats) per second.
                time.sleep(REPORT_SETTLE)
                watcher.wait_reports(names, 1)
                settled = time.monotonic()
                if replication > 1:
                    watcher.wait_reports(names, 2, since=settled)
                pids = [node.pid for node in cluster.nodes.values()]
                before = sum(cpu_seconds(pid) for pid in pids)
                share = messages // 3
                procs = []
                with contextlib.ExitStack() as files:
                    started = time.monotonic()
                    for index in range(3):
                        name = names[index % len(names)]
                        tag = f"scale-{len(names)}r{replication}-{index}"
                        err = files.enter_context((work / f"{tag}.err").open("wb"))
                        procs.append((work / f"{tag}.json", err, subprocess.Popen(
                            [sys.executable, "-m", "bench.loadtool", "--port", str(cluster.nodes[name].port),
                             "--messages", str(share), "--publishers", "1", "--consumers", "1",
                             "--topic", f"$queue/{queues[index]}", "--window", str(window),
                             "--client-prefix", f"s{len(names)}r{replication}-{index}",
                             "--json", str(work / f"{tag}.json")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)))
                    try:
                        for _, _, proc in procs:
                            proc.wait(600)
                    finally:
                        for _, _, proc in procs:  # (a timeout or an error leaves no load tool running)
                            kill_group(proc)
                    ended = time.monotonic()
                cpu = sum(cpu_seconds(pid) for pid in pids) - before
                for _, err, proc in procs:
                    if proc.returncode != 0:
                        raise RuntimeError(f"load tool exited with {proc.returncode}: "
                                           f"{Path(err.name).read_text().strip()}")
                time.sleep(REPORT_SETTLE)
                at_start, at_end = watcher.at(started), watcher.at(time.monotonic())
                idle = idle_rate(watcher, settled, started)
            # Idle time inside the counted interval: from each node's last report before the load to the start,
            # and from the end to its report read after it (heartbeats then are not the load's).
            idle_s = sum(started - seen for seen, _ in at_start.values()) + \
                sum(max(seen - ended, 0.0) for seen, _ in at_end.values())
            results = [json.loads(out.read_text()) for out, _, _ in procs]
            delivered = sum(r["delivered"] for r in results)
            rows.append({"case": label, "nodes": len(names), "replication": replication,
                         "msgs_per_s": sum(r["delivered_per_s"] or 0 for r in results),
                         "wall_msgs_per_s": delivered / (ended - started), "delivered": delivered,
                         "lost": sum(r["lost"] for r in results),
                         "duplicates": sum(r["duplicates"] for r in results),
                         "cpu_s_per_100k": cpu / delivered * 100_000 if delivered else None,
                         "grpc": diff_counts(at_start, at_end),
                         "idle_per_node_s": idle, "idle_s": idle_s})
        finally:
            stop(etcd, cluster)
    return rows


def idle_rate(watcher: ReportWatcher, since: float, until: float) -> dict[str, float]:
    """kind -> stream messages per second per node while idle (replication heartbeats), from each node's last two
    reports seen between ``since`` (once the start-up's counts were reported) and ``until``."""
    rates: dict[str, list[float]] = {}
    for versions in watcher.seen.values():
        before = [v for v in versions if since <= v[0] <= until]
        if len(before) >= 2:
            (t0, c0), (t1, c1) = before[-2], before[-1]
            if t1 > t0:
                for kind, (messages, _) in c1.items():
                    rates.setdefault(kind, []).append((messages - c0.get(kind, [0, 0])[0]) / (t1 - t0))
    return {kind: statistics.mean(r) for kind, r in rates.items() if statistics.mean(r) > 0}


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


def print_grpc(row: dict[str, Any]) -> None:
    grpc = row["grpc"]
    delivered = row["delivered"]
    if not any(messages for messages, _ in grpc.values()):
        print("      gRPC stream messages: none")
        return
    for kind in [k for k in KINDS if k in grpc] + sorted(k for k in grpc if k not in KINDS):
        messages, items = grpc[kind]
        if not messages:
            continue
        if kind == "link_frame":  # the gRPC messages themselves, their items the stream messages they carried
            line = (f"      {'gRPC (link frames)':<19} {messages:>8,} messages carrying {items:>9,} stream msgs: "
                    f"{messages / delivered:.4f} per queue message delivered, "
                    f"{items / messages:.1f} stream messages per gRPC message")
        else:
            line = (f"      {kind:<19} {messages:>8,} stream msgs carrying {items:>9,}: "
                    f"{messages / delivered:.4f} per queue message delivered, "
                    f"{items / messages:.1f} queue messages per stream message")
        rate = row["idle_per_node_s"].get(kind, 0.0)
        if rate:
            idle = rate * row["idle_s"]
            load_only = max(messages - idle, 1)
            line += (f" (of which ~{idle:,.0f} sent while idle, at {rate:.1f}/s per node, in the "
                     f"{row['idle_s']:.1f} node-s counted outside the load: without them "
                     f"{load_only / delivered:.4f} per queue message, {items / load_only:.1f} per stream message)")
        print(line)


def parse_steps(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
    """``--steps a,b`` as a list; a usage error for an unknown step or none."""
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in known]
    if unknown or not steps:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown) or '(none given)'}; choose from "
                     f"{', '.join(known)}")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps to run, of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--window", type=int, default=64,
                        help="PUBLISHes each load tool's publisher keeps in flight in the scale step (default: 64)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every row as JSON to PATH")
    args = parser.parse_args()
    interrupt_on_signals()
    steps = parse_steps(parser, args.steps, STEPS)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="shoalmq-bench-") as tmp:
        work = Path(tmp)
        if "forwarded" in steps:
            forwarded = [local_vs_forwarded(work / f"fw{i}", args.messages) for i in range(args.rounds)]
            report["forwarded"] = forwarded
            print("\n1. local vs forwarded, 1 publisher / 1 consumer, 100 B, fsync (median of rounds)")
            for index in range(2):
                case = [r[index] for r in forwarded]
                print(f"  {case[0]['case']}: {statistics.median(r['msgs_per_s'] for r in case):,.0f} msgs/s, "
                      f"CPU {statistics.median(r['cpu_s_per_100k'] for r in case):.2f} s per 100k (both nodes), "
                      f"lost {sum(r['lost'] for r in case)}, duplicates {sum(r['duplicates'] for r in case)}")
            ratios = [r[1]["cpu_s_per_100k"] / r[0]["cpu_s_per_100k"] for r in forwarded]
            print(f"  forwarded / local CPU per message: {statistics.median(ratios):.2f}x "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
        if "scale" in steps:
            scale = [one_vs_three(work / f"sc{i}", args.messages, args.window) for i in range(args.rounds)]
            report["scale"] = scale
            print(f"\n2. one node vs three (same total load; one load tool per node, window {args.window}; queues of 6 "
                  "partitions; CPU summed over all the brokers; median of rounds)")
            base_cpu = statistics.median(r[0]["cpu_s_per_100k"] for r in scale)
            base_rate = statistics.median(r[0]["wall_msgs_per_s"] for r in scale)
            for index in range(len(scale[0])):
                case = [r[index] for r in scale]
                cpu = statistics.median(r["cpu_s_per_100k"] for r in case)
                rate = statistics.median(r["wall_msgs_per_s"] for r in case)
                per_round = [r[index]["cpu_s_per_100k"] / r[0]["cpu_s_per_100k"] for r in scale]
                print(f"  {case[0]['case']}: {rate:,.0f} msgs/s ({rate / base_rate:.2f}x the one node's), "
                      f"CPU {cpu:.2f} s per 100k ({cpu / base_cpu:.2f}x the one node's; rounds "
                      f"{', '.join(f'{x:.2f}' for x in per_round)}), lost {sum(r['lost'] for r in case)}, "
                      f"duplicates {sum(r['duplicates'] for r in case)}")
                for number, row in enumerate(case, 1):
                    if len(case) > 1:
                        print(f"    round {number}:")
                    print_grpc(row)
        if "takeover" in steps:
            ttl = 3
            times = takeover(work, args.rounds, ttl)
            report["takeover"] = times
            print(f"\n3. takeover after SIGKILL (lease TTL {ttl} s, target {ttl + 1} s): "
                  f"{', '.join(f'{t:.2f}' for t in times)} s (median {statistics.median(times):.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
