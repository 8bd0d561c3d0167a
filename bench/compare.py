"""ShoalMQ's `$queue/` against mosquitto, same load, alternating, in one run: ``python -m bench.compare``.

For every configuration (publishers/consumers, payload size) and round, it starts a fresh ShoalMQ broker (fsync
durability, a new data directory) and runs the load tool on ``$queue/load``, then a fresh mosquitto (Debian's, on a
free port, persistence on, ``max_queued_messages 0`` so that it drops nothing it acknowledged) with its consumers on
``$share/g/bench/load``, and prints the medians of the rounds and the ratios ShoalMQ / mosquitto.

``--ordinary`` compares an ordinary topic instead: publishers and consumers on ``bench/load`` on both brokers, every
consumer getting every message (the load tool's ``--fan-out``); ``--consumers`` and ``--qos`` set those of each run
(``--ordinary --clients 1 --consumers 10 --qos 0``: a QoS 0 fan-out to ten).

``--metrics`` compares ShoalMQ with itself instead: metrics off (``--http-listen none --sys-interval 0``: no HTTP
server, no ``$SYS`` topics; the counters themselves are always kept) against metrics on (the HTTP server, ``$SYS``
every second, and ``/metrics`` scraped every ``--scrape-interval`` seconds through the run, 1 by default: fifteen
times Prometheus's usual rate), alternating round by round. Give it ``--messages`` enough for runs of several
seconds (the default 30,000 take under half a second).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


#: Extra load tool flags of every run (``main`` sets them: consumers, QoS, fan-out, the CA of TLS).
LOAD_FLAGS: list[str] = []
#: With ``--metrics``: seconds between two scrapes of ``/metrics`` (``--scrape-interval``).
SCRAPE_INTERVAL = [1.0]
#: With ``--tls``: the brokers' certificate and key (both brokers listen on TLS only).
TLS: dict[str, Path] = {}


def load(port: int, pid: int, topic: str, sub_topic: str, messages: int, size: int, clients: int,
         out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "bench.loadtool", "--port", str(port), "--topic", topic, "--sub-topic",
                    sub_topic, "--messages", str(messages), "--size", str(size), "--publishers", str(clients),
                    "--consumers", str(clients), "--broker-pid", str(pid), "--json", str(out), *LOAD_FLAGS],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=600)  # (its errors: on stderr)
    return json.loads(out.read_text())


class Scraper(threading.Thread):
    """GETs ``/metrics`` every ``interval`` s until stopped; keeps each scrape's duration."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.durations: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            start = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=30) as response:
                response.read()
            self.durations.append(time.perf_counter() - start)


def run_shoalmq(work: Path, messages: int, size: int, clients: int, ordinary: bool = False,
                metrics: bool | None = None) -> dict:
    """One run; ``metrics`` None: as shipped (HTTP on a free port, unscraped), False: off, True: on and scraped."""
    port = free_port()
    data = work / f"shoal-{port}"
    # No limit on a client's queue of ordinary messages, as mosquitto's max_queued_messages 0 below.
    listen = (["--listen", "none", "--tls-listen", f"127.0.0.1:{port}", "--certfile", str(TLS["cert"]),
               "--keyfile", str(TLS["key"])] if TLS else ["--listen", f"127.0.0.1:{port}"])
    http_port = free_port()
    if metrics is False:
        listen += ["--http-listen", "none", "--sys-interval", "0"]
    else:
        listen += ["--http-listen", f"127.0.0.1:{http_port}"] + (["--sys-interval", "1"] if metrics else [])
    log = work / f"shoal-{port}.log"
    broker = subprocess.Popen([str(BIN / "broker"), *listen, "--data-dir", str(data),
                               "--log-level", "warning", "--max-queued-messages", "0"],
                              stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    scraper = Scraper(f"http://127.0.0.1:{http_port}/metrics", SCRAPE_INTERVAL[0]) if metrics else None
    try:
        wait_listening(port, broker)
        if scraper is not None:
            wait_listening(http_port, broker)
            scraper.start()
        topic = "bench/load" if ordinary else "$queue/load"
        try:
            result = load(port, broker.pid, topic, topic, messages, size, clients, work / "r.json")
        except subprocess.CalledProcessError:
            print(f"the load tool failed; the broker (exit code {broker.poll()}) logged:\n{log.read_text()[-3000:]}",
                  file=sys.stderr)
            raise
        if scraper is not None:
            scraper.stopping.set()
            scraper.join(30)
            result["scrapes"] = scraper.durations
        return result
    finally:
        if scraper is not None:
            scraper.stopping.set()
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def run_mosquitto(work: Path, messages: int, size: int, clients: int, ordinary: bool = False) -> dict:
    port = free_port()
    store = work / f"mosq-{port}"
    store.mkdir()
    conf = work / "mosquitto.conf"
    tls = f"certfile {TLS['cert']}\nkeyfile {TLS['key']}\n" if TLS else ""
    conf.write_text(f"listener {port} 127.0.0.1\n{tls}allow_anonymous true\npersistence true\n"
                    f"persistence_location {store}/\nmax_queued_messages 0\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, broker)
        return load(port, broker.pid, "bench/load", "bench/load" if ordinary else "$share/g/bench/load", messages,
                    size, clients, work / "r.json")
    finally:
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(store, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="compare", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="100,1024", help="payload sizes, comma-separated")
    parser.add_argument("--clients", default="1,2", help="publishers (= consumers) per run, comma-separated")
    parser.add_argument("--ordinary", action="store_true", help="an ordinary topic (bench/load), not a queue: "
                        "every consumer gets every message (the load tool's --fan-out)")
    parser.add_argument("--consumers", type=int, default=None, help="consumers per run (default: as --clients)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--tls", action="store_true", help="both brokers on TLS only (a certificate made for the "
                        "run), the load tool over TLS")
    parser.add_argument("--metrics", action="store_true", help="ShoalMQ with metrics off against metrics on "
                        "(scraped every second), instead of against mosquitto")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="with --metrics: seconds between "
                        "two scrapes of /metrics (1)")
    args = parser.parse_args()
    SCRAPE_INTERVAL[0] = args.scrape_interval
    if args.consumers is not None:
        LOAD_FLAGS.extend(["--consumers", str(args.consumers)])  # (the later flag wins)
    LOAD_FLAGS.extend(["--qos", str(args.qos)] + (["--fan-out"] if args.ordinary else []))
    sizes = [int(s) for s in args.sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoalmq-compare-") as tmp:
        work = Path(tmp)
        if args.tls:
            from tests.tls_support import Authority  # (the test extra's cryptography makes the certificate)
            authority = Authority(work / "pki", "bench CA")
            pair = authority.issue("localhost", server=True)
            TLS.update(cert=pair.cert, key=pair.key)
            # mosquitto started as root reads its files as the user "mosquitto": let it (a throwaway key).
            for path in (work, work / "pki", pair.cert, pair.key):
                path.chmod(0o755 if path.is_dir() else 0o644)
            LOAD_FLAGS.extend(["--cafile", str(authority.path)])
        for size in sizes:
            for n in clients:
                shoal, other = [], []
                for _ in range(args.rounds):
                    if args.metrics:
                        other.append(run_shoalmq(work, args.messages, size, n, args.ordinary, metrics=False))
                        shoal.append(run_shoalmq(work, args.messages, size, n, args.ordinary, metrics=True))
                    else:
                        shoal.append(run_shoalmq(work, args.messages, size, n, args.ordinary))
                        other.append(run_mosquitto(work, args.messages, size, n, args.ordinary))
                rows.append((n, size, shoal, other))
    if args.metrics:
        return print_metrics(args, rows)
    what = "an ordinary topic" if args.ordinary else "ShoalMQ fsync'd $queue/ vs mosquitto's shared subscription"
    what += ", over TLS" if args.tls else ""
    fan = f", {args.consumers} consumers" if args.consumers is not None else ""
    print(f"{args.messages} QoS {args.qos} messages per run{fan}, {args.rounds} rounds, medians; {what}")
    print("| pub/con | size | ShoalMQ msgs/s | p50/p99 ms | CPU s/100K | mosquitto msgs/s | p50/p99 ms | CPU s/100K "
          "| throughput ratio | CPU ratio | lost/dup (ShoalMQ, mosquitto) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, size, shoal, mosq in rows:
        s_rate, q_rate = m(shoal, "delivered_per_s"), m(mosq, "delivered_per_s")
        s_cpu, q_cpu = m(shoal, "broker_cpu_per_100k"), m(mosq, "broker_cpu_per_100k")
        print(f"| {n}/{args.consumers or n} | {size} B | {s_rate:,.0f} | {m(shoal, 'latency_p50_ms'):.1f}/"
              f"{m(shoal, 'latency_p99_ms'):.1f} | {s_cpu:.2f} | {q_rate:,.0f} | {m(mosq, 'latency_p50_ms'):.1f}/"
              f"{m(mosq, 'latency_p99_ms'):.1f} | {q_cpu:.2f} | {s_rate / q_rate:.2f}x | {s_cpu / q_cpu:.2f}x | "
              f"{lost_dup(shoal)}, {lost_dup(mosq)} |")
    return 0


def m(runs: list[dict], key: str) -> float:
    """The median of one figure over the rounds."""
    return statistics.median(r[key] for r in runs)


def lost_dup(runs: list[dict]) -> str:
    """Messages lost and duplicated over the rounds, ``lost/dup``."""
    return f"{sum(r['lost'] for r in runs)}/{sum(r['duplicates'] for r in runs)}"


def print_metrics(args: argparse.Namespace, rows: list) -> int:
    what = "an ordinary topic" if args.ordinary else "$queue/"
    print(f"{args.messages} QoS {args.qos} messages per run, {args.rounds} rounds, medians; ShoalMQ {what}, "
          f"metrics off (no HTTP, no $SYS) vs on (/metrics scraped every {args.scrape_interval:g} s, $SYS every 1 s)")
    print("| pub/con | size | off msgs/s | off CPU s/100K | on msgs/s | on CPU s/100K | throughput on/off "
          "| CPU on/off | scrapes, median ms | lost/dup (off, on) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, size, on, off in rows:
        on_rate, off_rate = m(on, "delivered_per_s"), m(off, "delivered_per_s")
        on_cpu, off_cpu = m(on, "broker_cpu_per_100k"), m(off, "broker_cpu_per_100k")
        scrapes = [d for r in on for d in r["scrapes"]]
        print(f"| {n}/{args.consumers or n} | {size} B | {off_rate:,.0f} | {off_cpu:.2f} | {on_rate:,.0f} | "
              f"{on_cpu:.2f} | {on_rate / off_rate:.3f}x | {on_cpu / off_cpu:.3f}x | {len(scrapes)}, "
              f"{statistics.median(scrapes) * 1000 if scrapes else 0:.1f} | {lost_dup(off)}, {lost_dup(on)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
