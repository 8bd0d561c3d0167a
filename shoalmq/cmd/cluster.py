"""``broker cluster status``: what etcd says about a cluster, as tables (or JSON).

It reads the same keys ``etcdctl get --prefix /<cluster>/`` shows: the live nodes, the queues, each partition's
owner and epoch, and the depth each node last reported for the partitions it holds (every 2 s, when changed). A node
that is down keeps its last report: the messages only its disk has are shown as waiting on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from shoalmq.errors import ExitCode, ShoalError

PROG = "broker cluster"


def make_parser() -> argparse.ArgumentParser:
    from shoalmq.cmd.broker import _ArgumentParser

    parser = _ArgumentParser(prog=PROG, description="Inspect a ShoalMQ cluster through its etcd.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    status = sub.add_parser("status", help="nodes, partition owners and queue depths",
                            description="Print the cluster's nodes, partition owners and queue depths.")
    status.add_argument("--etcd", metavar="URLS", required=True,
                        help="etcd endpoints, comma-separated http://HOST:PORT (tried in turn)")
    status.add_argument("--cluster", metavar="NAME", default="shoalmq", help="the cluster's name (default: shoalmq)")
    status.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    _add_etcd_access(status)
    drain = sub.add_parser("drain", help="move a node's partitions to the other nodes (before maintenance)",
                           description="Drain a node: it hands every partition it owns or leads to the other nodes "
                           "and takes none, until it restarts or --undo. Asks the node's HTTP API (found in etcd, or "
                           "--http of any node).")
    drain.add_argument("node", help="the node's id")
    drain.add_argument("--etcd", metavar="URLS", help="etcd endpoints, to find the node's HTTP address")
    drain.add_argument("--cluster", metavar="NAME", default="shoalmq", help="the cluster's name (default: shoalmq)")
    drain.add_argument("--undo", action="store_true", help="end the drain: the node takes partitions again")
    drain.add_argument("--wait", metavar="SECONDS", type=float, default=0.0,
                       help="wait up to this long until the node leads no partition (exit 1 if it still does)")
    _add_etcd_access(drain)
    from shoalmq.cmd.queues import add_access_flags

    add_access_flags(drain)
    drain.set_defaults(http=None)
    return parser


def _add_etcd_access(parser: argparse.ArgumentParser) -> None:
    for flag, what in (("--etcd-cafile", "CA (PEM) that etcd's certificate is verified with"),
                       ("--etcd-certfile", "client certificate (PEM) presented to etcd"),
                       ("--etcd-keyfile", "the private key of --etcd-certfile"),
                       ("--etcd-user", "etcd user (password: --etcd-password-file or SHOALMQ_ETCD_PASSWORD)"),
                       ("--etcd-password-file", "a file holding the etcd user's password")):
        parser.add_argument(flag, metavar="NAME" if flag == "--etcd-user" else "PATH", default=None, help=what)


def read_status(etcd: Any, cluster: str) -> dict[str, Any]:
    """The cluster's state from etcd: nodes, queues, partitions (owner, epoch, depth) and what each node stores."""
    kvs, revision = etcd.get_prefix_sync(f"/{cluster}/".encode())
    prefix = f"/{cluster}/"
    nodes: dict[str, Any] = {}
    queues: dict[str, Any] = {}
    partitions: dict[str, dict[str, Any]] = {}
    loads: dict[str, Any] = {}
    for kv in kvs:
        kind, _, rest = kv.key.decode(errors="replace")[len(prefix):].partition("/")
        try:
            value = json.loads(kv.value)
        except ValueError:
            continue
        if kind == "nodes":
            nodes[rest] = value
        elif kind == "queues":
            queues[rest] = value
        elif kind == "partitions":
            if "leader" in value:  # a replicated partition's record
                partitions[rest] = {"owner": value.get("leader"), "epoch": value.get("epoch"),
                                    "replicas": value.get("replicas", []), "isr": value.get("isr", [])}
            else:
                partitions[rest] = {"owner": value.get("owner"), "epoch": kv.create_revision}
        elif kind == "load":
            loads[rest] = value
    for name, entry in partitions.items():
        queue, _, index = name.rpartition("/")
        load = loads.get(entry["owner"] or "", {}).get("owned", {})
        entry["messages"] = load.get(queue, {}).get(index)
    stored = {node: load.get("stored_not_owned", {}) for node, load in loads.items()
              if load.get("stored_not_owned") and node in nodes}
    return {"cluster": cluster, "revision": revision, "nodes": nodes, "queues": queues, "partitions": partitions,
            "stored_not_owned": stored, "down": _down(nodes, queues, partitions, loads)}


def _down(nodes: dict[str, Any], queues: dict[str, Any], partitions: dict[str, Any],
          loads: dict[str, Any]) -> dict[str, Any]:
    """The messages that wait on nodes that are not live, by their last load report (it outlives the node): those
    of the partitions they owned with one replica (a replicated partition's followers have its messages) and those
    they stored without owning them; of the queues that still exist (a deleted queue's copy is dropped when the
    node is back)."""
    down: dict[str, Any] = {}
    for node, load in loads.items():
        if node in nodes:
            continue
        waiting: dict[str, dict[str, int]] = {}
        for queue, parts in load.get("owned", {}).items():
            for index, depth in parts.items():
                if depth and queue in queues and "replicas" not in partitions.get(f"{queue}/{index}", {}):
                    waiting.setdefault(queue, {})[index] = depth
        for queue, parts in load.get("stored_not_owned", {}).items():
            for index, depth in parts.items():
                if depth and queue in queues:
                    mine = waiting.setdefault(queue, {})
                    mine[index] = mine.get(index, 0) + depth
        if waiting:
            down[node] = {"messages": waiting, "updated": load.get("updated"), "stopped": load.get("stopped")}
    return down


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _age(started: Any) -> str:
    if not isinstance(started, int):
        return "?"
    seconds = max(0, int(time.time()) - started)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def render(status: dict[str, Any]) -> str:
    partitions = status["partitions"]
    by_node: dict[str, list[str]] = {}
    for name, entry in partitions.items():
        by_node.setdefault(entry["owner"], []).append(name)
    out = [f"cluster {status['cluster']}: {len(status['nodes'])} node(s), {len(status['queues'])} queue(s)", ""]
    rows = [["NODE", "MQTT", "GRPC", "VERSION", "UP", "PARTITIONS", "MESSAGES"]]
    for node, info in sorted(status["nodes"].items()):
        owned = by_node.get(node, [])
        depth = sum(partitions[p]["messages"] or 0 for p in owned)
        rows.append([node, str(info.get("mqtt", "?")), str(info.get("grpc", "?")), str(info.get("version", "?")),
                     _age(info.get("started")), str(len(owned)), str(depth)])
    out += [_table(rows), ""]
    down = status.get("down", {})
    rows = [["QUEUE", "PARTITIONS", "OWNED", "MESSAGES", "ON DOWN NODES"]]
    for queue, settings in sorted(status["queues"].items()):
        count = settings.get("partitions", 0)
        mine = [entry for name, entry in partitions.items() if name.rpartition("/")[0] == queue]
        known = [e["messages"] for e in mine if e["messages"] is not None]
        waiting = sum(sum(d["messages"].get(queue, {}).values()) for d in down.values())
        rows.append([queue, str(count), f"{len(mine)}/{count}", str(sum(known)) if known else "?",
                     str(waiting) if waiting else "-"])
    out += [_table(rows), ""]
    rows = [["PARTITION", "LEADER", "EPOCH", "REPLICAS", "IN SYNC", "MESSAGES"]]
    for queue, settings in sorted(status["queues"].items()):
        for index in range(settings.get("partitions", 0)):
            entry = partitions.get(f"{queue}/{index}")
            if entry is None:
                rows.append([f"{queue}/{index}", "(none)", "-", "-", "-", "-"])
            else:
                messages = entry["messages"]
                replicas = ",".join(entry.get("replicas", [])) or "-"
                isr = entry.get("isr")
                in_sync = "-" if isr is None else ",".join(isr) or "(none)"
                if isr is not None and len(isr) < len(entry.get("replicas", [])):
                    in_sync += " (behind: " + ",".join(n for n in entry["replicas"] if n not in isr) + ")"
                rows.append([f"{queue}/{index}", str(entry["owner"]), str(entry["epoch"]), replicas, in_sync,
                             "?" if messages is None else str(messages)])
    out.append(_table(rows))
    for node, queues in sorted(status["stored_not_owned"].items()):
        for queue, parts in sorted(queues.items()):
            listed = ", ".join(f"{queue}/{p}: {n}" for p, n in sorted(parts.items(), key=lambda i: int(i[0])))
            out.append(f"\nnode {node} also stores messages of partitions it does not own (on their way to the "
                       f"owner): {listed}")
    for node, entry in sorted(down.items()):
        total = sum(sum(parts.values()) for parts in entry["messages"].values())
        listed = ", ".join(f"{queue}/{p}: {n}" for queue, parts in sorted(entry["messages"].items())
                           for p, n in sorted(parts.items(), key=lambda i: int(i[0])))
        when = (f"stopped {_age(entry['stopped'])} ago" if entry.get("stopped") else
                f"not live (its last report: {_age(entry['updated'])} ago)")
        out.append(f"\nnode {node} is {when} and holds {total} message(s) no live node has, delivered once it is "
                   f"back: {listed}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str]) -> int:
    args = make_parser().parse_args(argv)
    if args.command == "drain":
        return drain(args)
    return status(args)


def _open_etcd(args: argparse.Namespace) -> Any:
    """An ``Etcd`` for the flags; ShoalError (or ValueError for --etcd) if they are unusable."""
    from shoalmq.cluster.etcd import Etcd, etcd_access, parse_endpoints

    endpoints = parse_endpoints(args.etcd)
    access = etcd_access(args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile, args.etcd_user,
                         args.etcd_password_file)
    return Etcd(endpoints, access=access)


def drain(args: argparse.Namespace) -> int:
    from shoalmq.cmd.queues import ApiError, call

    what = "undrain" if args.undo else "drain"
    if args.http is None:
        if not args.etcd:
            print(f"{PROG} drain: error: give --etcd URLS (to find the node) or --http HOST:PORT of a node",
                  file=sys.stderr)
            return ExitCode.USAGE_ERROR
        try:
            etcd = _open_etcd(args)
        except ValueError as exc:
            print(f"{PROG} drain: error: --etcd: {exc}", file=sys.stderr)
            return ExitCode.USAGE_ERROR
        except ShoalError as exc:
            print(f"{PROG} drain: error: {exc}", file=sys.stderr)
            return exc.exit_code
        try:
            found = etcd.get_sync(f"/{args.cluster}/nodes/{args.node}".encode())
        except ShoalError as exc:
            print(f"{PROG} drain: error: {exc}", file=sys.stderr)
            return ExitCode.RUNTIME_ERROR
        finally:
            etcd.close()
        if found is None:
            print(f"{PROG} drain: error: no live node {args.node!r} in cluster {args.cluster!r}", file=sys.stderr)
            return ExitCode.RUNTIME_ERROR
        args.http = json.loads(found.value).get("http")
        if not args.http:
            print(f"{PROG} drain: error: node {args.node} has no HTTP API (--http-listen none)", file=sys.stderr)
            return ExitCode.RUNTIME_ERROR
    try:
        answer = call(args, "DELETE" if args.undo else "POST", f"/v1/nodes/{args.node}/drain")
        deadline = time.monotonic() + args.wait
        while not args.undo and answer.get("leads") and time.monotonic() < deadline:
            time.sleep(0.25)
            answer = call(args, "POST", f"/v1/nodes/{args.node}/drain")
    except ApiError as exc:
        print(f"{PROG} {what}: error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif args.undo:
        print(f"node {args.node} takes partitions again (it leads {answer['leads']} now)")
    elif answer["leads"]:
        print(f"node {args.node} is draining: it still leads {answer['leads']} partition(s)")
    else:
        print(f"node {args.node} is drained: it leads no partition")
    return ExitCode.RUNTIME_ERROR if args.wait and not args.undo and answer["leads"] else ExitCode.OK


def status(args: argparse.Namespace) -> int:
    from shoalmq.cluster.etcd import Etcd, etcd_access, parse_endpoints

    try:
        endpoints = parse_endpoints(args.etcd)
    except ValueError as exc:
        print(f"{PROG}: error: --etcd: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    try:
        access = etcd_access(args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile, args.etcd_user,
                             args.etcd_password_file)
    except ShoalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    etcd = Etcd(endpoints, access=access)
    try:
        status = read_status(etcd, args.cluster)
    except ShoalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    finally:
        etcd.close()
    if not (status["nodes"] or status["queues"] or status["partitions"]):
        print(f"{PROG}: error: etcd at {', '.join(endpoints)} has no cluster named {args.cluster!r} (no key under "
              f"/{args.cluster}/)", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(status))
    return ExitCode.OK
