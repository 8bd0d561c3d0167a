"""Command line, orchestration and report of the load tool (``python -m bench.loadtool``)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import random
import sys
import time
from typing import Any, NoReturn, Sequence

from bench.loadtool.workers import HEADER_SIZE, Settings, consumer_main, publisher_main

PROG = "loadtool"
MAX_PER_PUBLISHER = 2**32 - 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, got {value}")
    return value


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" after every flag that has a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and action.option_strings != ["-h", "--help"]:
            text += " (default: %(default)s)"
        return text


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        description="Measure an MQTT 3.1.1 broker: P publisher processes send N messages (QoS 1 with a window of "
                    "unacknowledged PUBLISHes, or QoS 0) to a topic, C consumer processes subscribed to a filter "
                    "acknowledge and check them. Reports publish and delivery rates, end-to-end latency, lost "
                    "and duplicated messages, and optionally the broker's CPU time.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker host")
    parser.add_argument("--port", type=_port, required=True, metavar="PORT", help="broker port")
    parser.add_argument("--cafile", default=None, metavar="PATH",
                        help="connect over TLS, verifying the broker's certificate with this CA (PEM)")
    parser.add_argument("--publishers", type=_positive_int, default=1, metavar="P", help="publisher processes")
    parser.add_argument("--consumers", type=_positive_int, default=1, metavar="C", help="consumer processes")
    parser.add_argument("--messages", type=_positive_int, default=100_000, metavar="N",
                        help="messages in total, split evenly among the publishers")
    parser.add_argument("--size", type=_positive_int, default=100, metavar="BYTES",
                        help=f"payload bytes per message (at least {HEADER_SIZE}: the header of publisher, "
                             "sequence number and send time)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1, help="QoS of the PUBLISHes")
    parser.add_argument("--window", type=_positive_int, default=64, metavar="W",
                        help="most unacknowledged PUBLISHes per publisher (at QoS 0: messages per send)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="MSGS_PER_S",
                        help="pace the publishers to this many messages per second in total (0: as fast as the "
                             "window allows); for latency at a given load")
    parser.add_argument("--fan-out", action="store_true",
                        help="every consumer gets every message (an ordinary topic), instead of one of them "
                             "(a queue or a shared subscription): lost and duplicates are counted per consumer")
    parser.add_argument("--topic", default="bench/load", metavar="TOPIC", help="the topic publishers send to")
    parser.add_argument("--sub-topic", default=None, metavar="FILTER",
                        help="the topic filter consumers subscribe to (QoS 1), e.g. $share/g/bench/load "
                             "(default: same as --topic)")
    parser.add_argument("--client-prefix", default="load", metavar="PREFIX",
                        help="client ids are PREFIX-pub-I and PREFIX-sub-I")
    parser.add_argument("--drain-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="seconds without a new delivery (after the publishers finished), or without a "
                             "PUBACK while messages are in flight, before giving up on the rest")
    parser.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="seconds for each connection's CONNACK (and SUBACK)")
    parser.add_argument("--broker-pid", type=_positive_int, default=None, metavar="PID",
                        help="the broker's process id: report its CPU seconds per 100,000 messages")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sub_topic is None:
        args.sub_topic = args.topic
    if args.size < HEADER_SIZE:
        parser.error(f"argument --size: must be at least {HEADER_SIZE} bytes (the payload header), "
                     f"got {args.size}")
    if args.window > 65535:
        parser.error(f"argument --window: at most 65535 (MQTT packet identifiers), got {args.window}")
    if args.messages // args.publishers >= MAX_PER_PUBLISHER:
        parser.error("argument --messages: at most 4,294,967,294 per publisher")
    for flag, value in (("--topic", args.topic), ("--sub-topic", args.sub_topic)):
        if not value or len(value.encode()) > 65535 or "\0" in value:
            parser.error(f"argument {flag}: not a valid MQTT topic: {value!r}")
    if "+" in args.topic or "#" in args.topic:
        parser.error(f"argument --topic: a topic to publish to has no wildcards: {args.topic!r}")
    if args.json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"argument --json: no directory {os.path.dirname(os.path.abspath(args.json))!r}")
    if args.broker_pid is not None:
        import psutil

        if not psutil.pid_exists(args.broker_pid):
            parser.error(f"argument --broker-pid: no process with pid {args.broker_pid}")
    return args


# -- the run -------------------------------------------------------------------------------------------------

class RunError(Exception):
    """The run could not be completed; the message is the one line shown."""


def _broker_cpu(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = _context()
    n, p = args.messages, args.publishers
    per_publisher = tuple(n // p + (1 if i < n % p else 0) for i in range(p))
    settings = Settings(
        host=args.host, port=args.port, topic=args.topic, sub_topic=args.sub_topic, qos=args.qos,
        size=args.size, window=args.window, client_prefix=args.client_prefix,
        drain_timeout=args.drain_timeout, connect_timeout=args.connect_timeout,
        run_id=random.randrange(1, 2**32), per_publisher=per_publisher, consumers=args.consumers,
        rate=args.rate / p if args.rate > 0 else 0.0, fan_out=args.fan_out, cafile=args.cafile,
    )
    control = ctx.Queue()
    go = ctx.Event()
    progress = ctx.RawArray("q", args.consumers)
    expected = ctx.RawValue("q", -1)
    seen = ctx.RawArray("B", max(n, 1))

    consumers = [ctx.Process(target=consumer_main, args=(i, control, settings, progress, expected, seen),
                             name=f"loadtool-consumer-{i}", daemon=True) for i in range(args.consumers)]
    publishers = [ctx.Process(target=publisher_main, args=(i, control, settings, go),
                              name=f"loadtool-publisher-{i}", daemon=True) for i in range(p)]
    roles = {("consumer", i): proc for i, proc in enumerate(consumers)}
    roles.update({("publisher", i): proc for i, proc in enumerate(publishers)})
    results: dict[tuple[str, int], dict[str, Any]] = {}
    ready: set[tuple[str, int]] = set()

    def next_message(deadline: float | None, waiting_for: str) -> tuple[Any, ...]:
        while True:
            timeout = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if timeout <= 0:
                raise RunError(f"timed out waiting for {waiting_for}")
            try:
                message = control.get(timeout=timeout)
            except queue.Empty:
                for (role, index), proc in roles.items():
                    if proc.exitcode is not None and (role, index) not in results:
                        # It may have put its last message just before exiting: look once more.
                        try:
                            return control.get(timeout=0.5)
                        except queue.Empty:
                            raise RunError(f"{role} {index} exited (code {proc.exitcode}) without a "
                                           "result") from None
                continue
            if message[0] == "error":
                raise RunError(message[1])
            return message

    try:
        for proc in consumers + publishers:
            proc.start()
        deadline = time.monotonic() + args.connect_timeout + 10  # + process start-up
        while len(ready) < len(roles):
            message = next_message(deadline, f"{len(roles) - len(ready)} connection(s) to "
                                             f"{args.host}:{args.port}")
            if message[0] == "ready":
                ready.add((message[1], message[2]))

        cpu_before = _broker_cpu(args.broker_pid)
        go.set()
        while sum(1 for key in results if key[0] == "publisher") < p:
            message = next_message(None, "the publishers")
            if message[0] == "result":
                results[(message[1], message[2])] = message[3]
        pub_results = [results[("publisher", i)] for i in range(p)]
        expected.value = sum(r["acked"] if args.qos else r["sent"] for r in pub_results)
        while len(results) < len(roles):
            message = next_message(None, "the consumers")
            if message[0] == "result":
                results[(message[1], message[2])] = message[3]
        cpu_after = _broker_cpu(args.broker_pid)
        for proc in consumers + publishers:
            proc.join(5)
    finally:
        for proc in consumers + publishers:
            if proc.is_alive():
                proc.terminate()
        for proc in consumers + publishers:
            if proc.pid is not None:
                proc.join(2)
                if proc.is_alive():
                    proc.kill()
                    proc.join()

    con_results = [results[("consumer", i)] for i in range(args.consumers)]
    return summarize(args, per_publisher, pub_results, con_results, cpu_before, cpu_after)


def summarize(args: argparse.Namespace, per_publisher: Sequence[int], pubs: list[dict[str, Any]],
              cons: list[dict[str, Any]], cpu_before: float | None, cpu_after: float | None) -> dict[str, Any]:
    import numpy as np

    total = sum(per_publisher)
    offsets = np.cumsum([0, *per_publisher[:-1]]).astype(np.int64)
    limits = np.asarray(per_publisher, dtype=np.int64)

    # What was sent (QoS 0) or acknowledged (QoS 1), as one flag per message of the run.
    confirmed = np.zeros(total, dtype=bool)
    for i, r in enumerate(pubs):
        start = offsets[i]
        if args.qos:
            confirmed[start:start + per_publisher[i]] = np.frombuffer(r["acked_map"], dtype=np.uint8) != 0
        else:
            confirmed[start:start + r["sent"]] = True

    def tally(results: list[dict[str, Any]]) -> tuple[Any, Any, int, int, int, int, int]:
        """(keys' valid mask, latencies, deliveries, unique, duplicates, lost, invalid) of these consumers' keys."""
        keys = np.concatenate([np.frombuffer(r["keys"], dtype=np.uint64) for r in results]
                              or [np.zeros(0, np.uint64)])
        lats = np.concatenate([np.frombuffer(r["lats"], dtype=np.int64) for r in results]
                              or [np.zeros(0, np.int64)])
        pub_of = (keys >> np.uint64(32)).astype(np.int64)
        seq_of = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
        valid = pub_of < len(per_publisher)
        valid[valid] = seq_of[valid] < limits[pub_of[valid]]
        counts = np.bincount(offsets[pub_of[valid]] + seq_of[valid], minlength=total)
        deliveries, unique = int(valid.sum()), int(np.count_nonzero(counts))
        return (valid, lats, deliveries, unique, deliveries - unique,
                int(np.count_nonzero(confirmed & (counts == 0))), int((~valid).sum()))

    # Competing consumers: each message once, to any of them. Fan-out: each message to every consumer, so each
    # consumer is tallied alone and the figures summed.
    groups = [[r] for r in cons] if args.fan_out else [cons]
    tallies = [tally(group) for group in groups]
    valid = np.concatenate([t[0] for t in tallies])
    lats = np.concatenate([t[1] for t in tallies])
    deliveries, unique, duplicates, lost = (sum(t[i] for t in tallies) for i in (2, 3, 4, 5))
    foreign = sum(r["foreign"] for r in cons) + sum(t[6] for t in tallies)

    sent = sum(r["sent"] for r in pubs)
    acked = sum(r["acked"] for r in pubs) if args.qos else None
    confirmed_count = acked if args.qos else sent
    firsts = [r["t_first"] for r in pubs if r["t_first"]]
    ends = [r["t_end"] for r in pubs if r["t_end"]]
    t_first = min(firsts) if firsts else 0
    publish_s = (max(ends) - t_first) / 1e9 if firsts and ends else None
    last_delivery = max((r["t_last"] for r in cons), default=0)
    deliver_s = (last_delivery - t_first) / 1e9 if firsts and last_delivery > t_first else None
    lat_ms = lats[valid] / 1e6
    if lat_ms.size:
        p50, p99 = (float(x) for x in np.percentile(lat_ms, [50, 99]))
        lat_max = float(lat_ms.max())
    else:
        p50 = p99 = lat_max = None

    broker_cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    tool_cpu = sum(r["cpu"] for r in pubs) + sum(r["cpu"] for r in cons)
    per100k = (lambda seconds: seconds / confirmed_count * 100_000 if confirmed_count else None)

    return {
        "broker": f"{args.host}:{args.port}",
        "publishers": args.publishers,
        "consumers": args.consumers,
        "messages": args.messages,
        "size": args.size,
        "qos": args.qos,
        "window": args.window,
        "rate": args.rate,
        "fan_out": args.fan_out,
        "topic": args.topic,
        "sub_topic": args.sub_topic,
        "published": sent,
        "acked": acked,
        "delivered": deliveries,
        "delivered_unique": unique,
        "lost": lost,
        "duplicates": duplicates,
        "foreign": foreign,
        "publish_seconds": publish_s,
        "published_per_s": confirmed_count / publish_s if publish_s else None,
        "deliver_seconds": deliver_s,
        "delivered_per_s": deliveries / deliver_s if deliver_s else None,
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "latency_max_ms": lat_max,
        "broker_pid": args.broker_pid,
        "broker_cpu_seconds": broker_cpu,
        "broker_cpu_per_100k": per100k(broker_cpu) if broker_cpu is not None else None,
        "tool_cpu_per_100k": per100k(tool_cpu),
        "publishers_stalled": sum(1 for r in pubs if r["stalled"]),
        "consumers_timed_out": sum(1 for r in cons if r["timed_out"]),
    }


# -- report --------------------------------------------------------------------------------------------------

def _num(value: float | int | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def format_report(r: dict[str, Any]) -> str:
    qos = f"QoS {r['qos']}" + (f", window {r['window']}" if r["qos"] else f", {r['window']} per send")
    lines = [
        f"broker {r['broker']}: {r['publishers']} publisher(s) -> {r['consumers']} consumer(s), "
        f"{r['messages']:,} messages of {r['size']} B, {qos}",
        f"publish to {r['topic']!r}, subscribe to {r['sub_topic']!r}",
        "",
    ]
    rows = [
        ("published", _num(r["published"])),
        ("PUBACKed", _num(r["acked"]) if r["qos"] else "n/a (QoS 0)"),
        ("delivered", _num(r["delivered"]) + f"  ({r['delivered_unique']:,} distinct)"),
        ("lost", _num(r["lost"])),
        ("duplicates", _num(r["duplicates"])),
        ("published/s", _num(r["published_per_s"]) + f"  over {_num(r['publish_seconds'], '.3f', ' s')}"),
        ("delivered/s", _num(r["delivered_per_s"]) + f"  over {_num(r['deliver_seconds'], '.3f', ' s')}"),
        ("latency p50", _num(r["latency_p50_ms"], ".2f", " ms")),
        ("latency p99", _num(r["latency_p99_ms"], ".2f", " ms")),
        ("latency max", _num(r["latency_max_ms"], ".2f", " ms")),
    ]
    if r["broker_pid"] is not None:
        rows.append(("broker CPU / 100K", _num(r["broker_cpu_per_100k"], ".3f", " s")
                     + f"  ({_num(r['broker_cpu_seconds'], '.2f', ' s')} in all, pid {r['broker_pid']})"))
    rows.append(("load tool CPU / 100K", _num(r["tool_cpu_per_100k"], ".3f", " s")))
    if r["foreign"]:
        rows.append(("foreign deliveries", f"{r['foreign']:,}  (not of this run; ignored)"))
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except RunError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(format_report(report), flush=True)
    if report["publishers_stalled"]:
        print(f"{PROG}: warning: {report['publishers_stalled']} publisher(s) got no PUBACK for "
              f"{args.drain_timeout:g} s and stopped early", file=sys.stderr)
    if report["consumers_timed_out"] and (report["lost"] or report["delivered_unique"] < (report["acked"] or 0)):
        print(f"{PROG}: warning: consumers gave up after {args.drain_timeout:g} s without a new delivery",
              file=sys.stderr)
    if args.json:
        try:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=2)
                out.write("\n")
        except OSError as exc:
            print(f"{PROG}: error: cannot write {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0
