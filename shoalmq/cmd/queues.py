"""``broker queues list|describe|purge|delete|redrive``: a node's HTTP API from the command line.

They talk to one node (``--http HOST:PORT``, by default the local broker's ``127.0.0.1:18883``); on a cluster that
node answers for every node. Credentials: ``--user`` (password from ``--password-file`` or
``SHOALMQ_HTTP_PASSWORD``) or ``--token-file``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shoalmq.config import base_url
from shoalmq.errors import ExitCode

PROG = "broker queues"
DEFAULT_HTTP = "127.0.0.1:18883"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def add_access_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http", metavar="HOST:PORT", default=DEFAULT_HTTP,
                        help=f"the node's HTTP API (default: {DEFAULT_HTTP}; https://HOST:PORT for one serving HTTPS)")
    parser.add_argument("--cafile", metavar="PATH", help="the CA (PEM) an HTTPS server's certificate is verified "
                        "with (default: the system's)")
    parser.add_argument("--user", metavar="NAME", help="a user of the broker's password file (an administrator, "
                        "for purge, delete and redrive)")
    parser.add_argument("--password-file", metavar="PATH",
                        help="a file holding --user's password (else the variable SHOALMQ_HTTP_PASSWORD)")
    parser.add_argument("--token-file", metavar="PATH", help="a file holding the HTTP API's bearer token")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")


def authorization(args: argparse.Namespace) -> str | None:
    if args.token_file:
        return "Bearer " + Path(args.token_file).read_text(encoding="utf-8").splitlines()[0].strip()
    if args.user:
        if args.password_file:
            password = Path(args.password_file).read_text(encoding="utf-8").splitlines()[0]
        else:
            password = os.environ.get("SHOALMQ_HTTP_PASSWORD")
            if password is None:
                raise ApiError(0, "--user needs a password: --password-file, or SHOALMQ_HTTP_PASSWORD")
        return "Basic " + base64.b64encode(f"{args.user}:{password}".encode()).decode()
    return None


def call(args: argparse.Namespace, method: str, path: str, query: dict[str, str] | None = None,
         timeout: float = 30.0) -> Any:
    """The JSON answer of the node; ApiError (the API's message) if it refuses or cannot be reached."""
    url = base_url(args.http) + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
    request = urllib.request.Request(url, method=method)
    auth = authorization(args)
    if auth:
        request.add_header("Authorization", auth)
    context = None
    if url.startswith("https://"):
        try:
            context = ssl.create_default_context(cafile=getattr(args, "cafile", None))
        except (OSError, ssl.SSLError) as exc:
            raise ApiError(0, f"--cafile: cannot load {args.cafile}: {exc}") from None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {}
        message = body.get("error", exc.reason) if isinstance(body, dict) else exc.reason
        if exc.code == 502 and isinstance(body, dict) and body.get("failed"):
            message = "some nodes did not answer: " + "; ".join(f"{n}: {e}" for n, e in body["failed"].items())
        raise ApiError(exc.code, f"{message} (HTTP {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(0, f"cannot reach the HTTP API at {args.http}: {reason}") from None


def make_parser() -> argparse.ArgumentParser:
    from shoalmq.cmd.broker import _ArgumentParser

    parser = _ArgumentParser(prog=PROG, description="List, inspect and administer a broker's queues through its "
                             "HTTP API (on a cluster, any node answers for all).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (("list", "every queue with its depth, consumers and rates"),
                       ("describe", "one queue: settings, partitions, consumers and where they are connected"),
                       ("purge", "remove every ready message of a queue (in-flight ones stay)"),
                       ("delete", "delete a queue with its messages (refused while it has consumers)"),
                       ("redrive", "move a dead-letter queue's messages back to its queue")):
        command = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name != "list":
            command.add_argument("queue", help="the queue's name" + (" (or of its dead-letter queue, <name>.dlq)"
                                                                     if name == "redrive" else ""))
        if name == "redrive":
            command.add_argument("--limit", type=int, metavar="N", help="move at most N messages")
        add_access_flags(command)
    return parser


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def render_list(answer: dict[str, Any]) -> str:
    rows = [["QUEUE", "READY", "UNACKED", "CONSUMERS", "PUBLISH/S", "DELIVER/S", "DEAD-LETTERED"]]
    for q in answer["queues"]:
        rows.append([q["name"], str(q["ready"]), str(q["unacked"]), str(q["consumers"]), str(q["publish_rate"]),
                     str(q["deliver_rate"]), str(q.get("dead_lettered", 0))])
    out = _table(rows) if answer["queues"] else "no queues"
    for node, why in sorted(answer.get("unreachable", {}).items()):
        out += f"\nnode {node} did not answer: {why}"
    return out + "\n"


def render_queue(q: dict[str, Any]) -> str:
    settings = q.get("settings", {})
    out = [f"queue {q['name']}: {q['ready']} ready, {q['unacked']} unacked, {len(q['consumers'])} consumer(s)",
           "settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
           f"counts: published {q.get('published', 0)}, delivered {q.get('delivered', 0)}, redelivered "
           f"{q.get('redelivered', 0)}, acked {q.get('acked', 0)}, dead-lettered {q.get('dead_lettered', 0)}, "
           f"expired {q.get('expired', 0)}, purged {q.get('purged', 0)}"
           + (", refused " + ", ".join(f"{r} {n}" for r, n in sorted(q["refused"].items())) if q.get("refused")
              else ""), ""]
    rows = [["PARTITION", "NODE", "READY", "UNACKED", "ROLE"]]
    for p in q["partitions"]:
        rows.append([str(p["partition"]), str(p.get("node", "local")), str(p["ready"]), str(p["unacked"]),
                     "owner" if p["writes"] else "stored here, on its way to the owner"])
    out += [_table(rows), ""]
    if q["consumers"]:
        rows = [["CONSUMER", "ADDRESS", "NODE", "UNACKED", "WINDOW"]]
        for c in q["consumers"]:
            rows.append([str(c["client_id"]), str(c["address"]), str(c["node"]), str(c["unacked"]),
                         str(c["window"])])
        out += [_table(rows), ""]
    for node, why in sorted(q.get("unreachable", {}).items()):
        out.append(f"node {node} did not answer: {why}")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: Sequence[str]) -> int:
    args = make_parser().parse_args(argv)
    name = urllib.parse.quote(getattr(args, "queue", "") or "", safe="")
    try:
        if args.command == "list":
            answer = call(args, "GET", "/v1/queues")
            text = render_list(answer)
        elif args.command == "describe":
            answer = call(args, "GET", f"/v1/queues/{name}")
            text = render_queue(answer)
        elif args.command == "purge":
            answer = call(args, "POST", f"/v1/queues/{name}/purge")
            text = f"purged {answer['purged']} message(s) of {args.queue}\n"
        elif args.command == "redrive":
            query = {"limit": str(args.limit)} if args.limit else None
            answer = call(args, "POST", f"/v1/queues/{name}/redrive", query)
            text = f"moved {answer['moved']} message(s) from {answer['queue']} back to its queue\n"
        else:
            answer = call(args, "DELETE", f"/v1/queues/{name}")
            text = f"deleted queue {args.queue} with {answer['messages']} message(s)"
            if answer.get("nodes"):
                text += f" on {len(answer['nodes'])} node(s)"
            if answer.get("unconfirmed"):
                text += (f"; node(s) {', '.join(answer['unconfirmed'])} did not confirm in time (they drop it when "
                         "they see the delete)")
            text += "\n"
    except ApiError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME_ERROR if exc.status != 400 else ExitCode.USAGE_ERROR
    sys.stdout.write(json.dumps(answer, indent=2, sort_keys=True) + "\n" if args.json else text)
    return ExitCode.OK
