"""The node's HTTP server (aiohttp, in the broker's event loop): ``/metrics``, the JSON API, administration and the
dashboard, and the ``$SYS`` topics' publisher.

Access. Without a password file or a token file, everything is open, and (like the MQTT listeners) the server
listens on loopback only unless ``allow_anonymous`` is set. With either, read-only requests from loopback stay
open; any other request needs ``Authorization``: ``Bearer <token>`` (the token file's first line), or ``Basic``
with a user of the password file, which for administration (anything but GET) the ACL must grant write access to
the topic ``$SYS/shoalmq/admin``.

On a cluster a node answers for the whole cluster by asking the others (``scope=local`` on the same path, with the
request's own ``Authorization``), each at most ``PEER_TIMEOUT`` seconds: a node that does not answer is listed as
unreachable, not waited for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import importlib.resources
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web

from shoalmq import __version__
from shoalmq.broker.security import WRITE, Identity, is_loopback, load_certificates, server_context
from shoalmq.config import HostPort, base_url
from shoalmq.errors import ConfigError, ShoalError, StartupError, os_error_text
from shoalmq.ops import state
from shoalmq.ops.metrics import registry_for, render
from shoalmq.ops.systopics import SysPublisher
from shoalmq.queue.config import DLQ_SUFFIX
from shoalmq.queue.manager import QueueError, QueueInUse, UnknownQueue

if TYPE_CHECKING:
    from shoalmq.node import Node

log = logging.getLogger(__name__)

#: Seconds a node waits for another's answer when it answers for the cluster.
PEER_TIMEOUT = 2.0
#: The topic whose write access makes a password-file user an administrator of the HTTP API.
ADMIN_TOPIC = "$SYS/shoalmq/admin"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, "status": status, **extra}, status=status)


class OpsServer:
    """The HTTP server of one node (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.config = node.config
        self.registry = registry_for(node)
        self.rates = state.Rates()
        self.token = read_secret_file(self.config.http_token_file, "--http-token-file") \
            if self.config.http_token_file is not None else None
        self.sys = SysPublisher(node) if self.config.sys_interval else None
        self._runner: web.AppRunner | None = None
        self._client: ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.address: str | None = None
        #: The server's TLS context with ``http_certfile`` (``reload`` loads the files again into it).
        self.tls: ssl.SSLContext | None = None
        self.app = self._make_app()

    # -- life -----------------------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._access], client_max_size=64 << 10)
        get, post, delete = app.router.add_get, app.router.add_post, app.router.add_delete
        get("/", self.dashboard)
        get("/metrics", self.metrics)
        get("/healthz", self.healthz)
        get("/readyz", self.readyz)
        get("/v1/node", self.node_info)
        get("/v1/cluster/info", self.cluster_info)
        get("/v1/cluster/members", self.members)
        get("/v1/cluster/partitions", self.partitions)
        get("/v1/queues", self.queues)
        get("/v1/queues/{name}", self.queue)
        post("/v1/queues/{name}/purge", self.purge)
        post("/v1/queues/{name}/redrive", self.redrive)
        delete("/v1/queues/{name}", self.delete)
        post("/v1/nodes/{node}/drain", self.drain)
        delete("/v1/nodes/{node}/drain", self.undrain)
        get("/v1/dashboard", self.dashboard_data)
        return app

    async def start(self) -> None:
        listen = self.config.http_listen
        assert listen is not None
        config = self.config
        tls = None
        if config.http_certfile is not None:
            assert config.http_keyfile is not None
            tls = self.tls = server_context(config.http_certfile, config.http_keyfile, None, False)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, listen.host, listen.port, reuse_address=True, backlog=128,
                           ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise StartupError(f"cannot listen for HTTP on {listen}: {os_error_text(exc)}") from None
        host, port = site._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
        # (what peers and the CLI reach it at: host:port for HTTP, with the scheme for HTTPS)
        self.address = f"https://{HostPort(host, port)}" if tls is not None else str(HostPort(host, port))
        log.info("HTTP API, metrics and dashboard on %s/", base_url(self.address))

    def reload(self) -> None:
        """SIGHUP: load the HTTPS certificate and key again (new connections get them; open ones stay)."""
        config = self.config
        if self.tls is None or config.http_certfile is None or config.http_keyfile is None:
            return
        try:
            load_certificates(self.tls, config.http_certfile, config.http_keyfile, None)
            log.info("reloaded the HTTPS certificate %s", config.http_certfile)
        except ShoalError as exc:
            log.error("reload: %s; the HTTP server keeps the previous certificate", exc)

    def started(self) -> None:
        """The node serves: sample the rates, publish ``$SYS``."""
        self._tasks.append(asyncio.create_task(self._sample(), name="shoalmq-rates"))
        if self.sys is not None:
            self._tasks.append(asyncio.create_task(self.sys.run(self.config.sys_interval), name="shoalmq-sys"))

    async def stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def stop(self) -> None:
        await self.stop_background()
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _sample(self) -> None:
        while True:
            if self.node.queues is not None:
                self.rates.sample(self.node)
            await asyncio.sleep(self.rates.period)

    # -- access and errors ----------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error(exc.status, exc.reason if exc.text is None or exc.text.startswith(f"{exc.status}:")
                         else exc.text)
        except UnknownQueue as exc:
            return error(404, str(exc))
        except QueueInUse as exc:
            return error(409, str(exc))
        except (QueueError, ValueError) as exc:
            return error(400, str(exc))
        except ShoalError as exc:
            return error(503, str(exc))

    @web.middleware
    async def _access(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        return await handler(request)

    async def _refusal(self, request: web.Request) -> web.Response | None:
        """None if the request may go on; else the 401 or 403 answer."""
        config = self.config
        if config.password_file is None and self.token is None:
            return None
        peer = request.remote or ""
        admin = request.method not in ("GET", "HEAD")
        if not admin and is_loopback(peer):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and self.token is not None:
            if hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
                return None
            return self._unauthorized("bad token")
        if scheme.lower() == "basic" and config.password_file is not None:
            try:
                username, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return self._unauthorized("malformed Basic credentials")
            front_end = self.node.front_end
            if front_end is None:
                return error(503, "the node is starting")
            code, user = await front_end.security.authenticate(username, password.encode(), peer)
            if code:
                return self._unauthorized("bad username or password")
            if admin and not front_end.security.may(Identity("", user), ADMIN_TOPIC, WRITE):
                return error(403, f"user {user!r} is not an administrator (the ACL must grant it write access to "
                                  f"{ADMIN_TOPIC})")
            return None
        return self._unauthorized("credentials required")

    @staticmethod
    def _unauthorized(why: str) -> web.Response:
        response = error(401, why)
        response.headers["WWW-Authenticate"] = 'Basic realm="ShoalMQ"'
        return response

    # -- the cluster ----------------------------------------------------------------------------------------

    def _peers(self) -> dict[str, str]:
        """Other live nodes -> their HTTP address."""
        cluster = self.node.cluster
        if cluster is None:
            return {}
        return {node: info["http"] for node, info in cluster.membership.nodes.items()
                if node != cluster.node_id and info.get("http")}

    async def _ask(self, address: str, method: str, path: str, request: web.Request,
                   params: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, JSON answer) of another node; status 0 if it did not answer."""
        if self._client is None:
            # A peer serving HTTPS is verified against the system's CAs and the CAs this node is given (its MQTT
            # and cluster CAs): its certificate must name the address it registered.
            verify = ssl.create_default_context()
            for cafile in (self.config.cafile, self.config.cluster_cafile):
                if cafile is not None:
                    verify.load_verify_locations(cafile=str(cafile))
            self._client = ClientSession(timeout=ClientTimeout(total=PEER_TIMEOUT),
                                         connector=TCPConnector(ssl=verify))
        headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
        try:
            async with self._client.request(method, f"{base_url(address)}{path}", headers=headers,
                                            params={**(params or {}), "scope": "local"}) as response:
                return response.status, await response.json(content_type=None)
        except (OSError, asyncio.TimeoutError, ValueError, ClientError) as exc:
            return 0, {"error": f"no answer from {address}: {exc or type(exc).__name__}"}

    async def _everyone(self, method: str, path: str, request: web.Request, local: Callable[[], Awaitable[Any]],
                        params: dict[str, str] | None = None) -> dict[str, tuple[int, Any]]:
        """Node id -> (status, answer): this node's own (``local``) and, on a cluster, every other's."""
        me = state.node_id(self.node)
        peers = self._peers() if request.query.get("scope") != "local" else {}

        async def mine() -> tuple[int, Any]:
            try:
                return 200, await local()
            except UnknownQueue as exc:
                return 404, {"error": str(exc)}
            except QueueInUse as exc:
                return 409, {"error": str(exc)}
            except (QueueError, ValueError) as exc:
                return 400, {"error": str(exc)}

        names = [me, *peers]
        answers = await asyncio.gather(mine(), *(self._ask(a, method, path, request, params)
                                                 for a in peers.values()))
        return dict(zip(names, answers, strict=True))

    # -- health ---------------------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "node": state.node_id(self.node)})

    def readiness(self) -> list[str]:
        """Why the node does not serve (empty: it does)."""
        node = self.node
        reasons = [] if node.ready else ["the node is starting or stopping"]
        cluster = node.cluster
        if cluster is not None:
            if not cluster.membership.lease_valid():
                reasons.append("etcd is not reachable (the node's lease is not certainly alive)")
            view = cluster.coordinator.view
            unowned = [f"{name}/{p}" for name, config in view.definitions.items()
                       for p in range(config.partitions) if (name, p) not in view.owners]
            if unowned:
                reasons.append(f"{len(unowned)} partition(s) have no owner yet: {', '.join(unowned[:5])}")
        return reasons

    async def readyz(self, request: web.Request) -> web.Response:
        reasons = self.readiness()
        return web.json_response({"ready": not reasons, "reasons": reasons, "node": state.node_id(self.node)},
                                 status=200 if not reasons else 503)

    # -- reading --------------------------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=render(self.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def node_info(self, request: web.Request) -> web.Response:
        return web.json_response({**state.node_local(self.node), "ready_reasons": self.readiness()})

    async def cluster_info(self, request: web.Request) -> web.Response:
        node = self.node
        cluster = node.cluster
        info: dict[str, Any] = {"version": __version__, "node": state.node_id(node)}
        if cluster is None:
            assert node.queues is not None
            queues = node.queues.queues()
            info.update({"mode": "single", "nodes": 1, "queues": len(queues),
                         "partitions": sum(len(q.partitions) for q in queues)})
        else:
            view = cluster.coordinator.view
            info.update({"mode": "cluster", "cluster": self.config.cluster, "routing": self.config.routing,
                         "assigner": self.config.assigner, "etcd": list(self.config.etcd or ()),
                         "nodes": len(view.nodes), "queues": len(view.definitions),
                         "partitions": sum(c.partitions for c in view.definitions.values()),
                         "leaders": len({o.node for o in view.owners.values()})})
        return web.json_response(info)

    async def _members(self, request: web.Request) -> list[dict[str, Any]]:
        node = self.node
        answers = await self._everyone("GET", "/v1/node", request, self._node_local)
        if node.cluster is None:
            return [{**answers["local"][1], "reachable": True}]
        view = node.cluster.coordinator.view
        leads: dict[str, int] = {}
        for owner in view.owners.values():
            leads[owner.node] = leads.get(owner.node, 0) + 1
        members = []
        for member, info in sorted(view.nodes.items()):
            status, answer = answers.get(member, (0, {"error": "no HTTP address registered"}))
            entry = {"node": member, "mqtt": info.get("mqtt"), "grpc": info.get("grpc"), "http": info.get("http"),
                     "version": info.get("version"), "started": info.get("started"),
                     "draining": bool(info.get("draining")), "leads": leads.get(member, 0),
                     "reachable": status == 200, "self": member == node.cluster.node_id}
            if status == 200:
                entry.update({k: answer.get(k) for k in ("ready", "ready_reasons", "clients_connected", "uptime_seconds",
                                                         "lease_valid", "memory_ring_bytes")})
            else:
                entry["error"] = answer.get("error") if isinstance(answer, dict) else str(answer)
            members.append(entry)
        return members

    async def _node_local(self) -> dict[str, Any]:
        return {**state.node_local(self.node), "ready_reasons": self.readiness()}

    async def members(self, request: web.Request) -> web.Response:
        return web.json_response({"members": await self._members(request)})

    async def _local_queues(self) -> list[dict[str, Any]]:
        assert self.node.queues is not None
        return [state.queue_local(self.node, q, self.rates) for q in sorted(self.node.queues.queues(),
                                                                             key=lambda q: q.name)]

    async def _queue_table(self, request: web.Request) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Queue name -> the queue over every node (counts summed, partitions and consumers gathered), and the
        nodes that did not answer -> why."""
        answers = await self._everyone("GET", "/v1/queues", request, self._local_queues)
        merged: dict[str, dict[str, Any]] = {}
        missing = {}
        for member, (status, answer) in answers.items():
            if status != 200:
                missing[member] = answer.get("error", f"status {status}") if isinstance(answer, dict) else "?"
                continue
            for row in (answer["queues"] if isinstance(answer, dict) else answer):
                for part in row["partitions"]:
                    part["node"] = member
                total = merged.get(row["name"])
                if total is None:
                    merged[row["name"]] = row
                    continue
                for key in ("ready", "unacked", "depth", "published", "delivered", "redelivered", "acked",
                            "dead_lettered", "expired", "purged", "redriven", "publish_rate", "deliver_rate"):
                    total[key] += row[key]
                for reason, count in row["refused"].items():
                    total["refused"][reason] = total["refused"].get(reason, 0) + count
                total["consumers"] += row["consumers"]
                total["partitions"] += row["partitions"]
        cluster = self.node.cluster
        if cluster is not None:  # a defined queue no node has opened yet
            for name, config in cluster.coordinator.view.definitions.items():
                if name not in merged:
                    merged[name] = {"name": name, "settings": {"partitions": config.partitions}, "ready": 0,
                                    "unacked": 0, "depth": 0, "consumers": [], "partitions": [],
                                    "publish_rate": 0, "deliver_rate": 0}
        for row in merged.values():
            row["partitions"].sort(key=lambda p: (p["partition"], not p["writes"]))
            row["publish_rate"] = round(row["publish_rate"], 1)
            row["deliver_rate"] = round(row["deliver_rate"], 1)
        return merged, missing

    async def queues(self, request: web.Request) -> web.Response:
        if request.query.get("scope") == "local":
            return web.json_response({"queues": await self._local_queues()})
        table, missing = await self._queue_table(request)
        rows = [{k: v for k, v in row.items() if k != "partitions"} | {"consumers": len(row["consumers"])}
                for _, row in sorted(table.items())]
        return web.json_response({"queues": rows, "unreachable": missing})

    async def queue(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        table, missing = await self._queue_table(request)
        row = table.get(name)
        if row is None:
            return error(404, f"no queue named {name!r}")
        return web.json_response({**row, "unreachable": missing})

    async def partitions(self, request: web.Request) -> web.Response:
        return web.json_response({"partitions": await self._partition_rows(request)})

    async def _partition_rows(self, request: web.Request) -> list[dict[str, Any]]:
        table, _ = await self._queue_table(request)
        depth = {}
        for name, row in table.items():
            for part in row["partitions"]:
                if part["writes"] or (name, part["partition"]) not in depth:
                    depth[name, part["partition"]] = part["depth"]
        node = self.node
        rows = []
        if node.cluster is None:
            for name, row in sorted(table.items()):
                for part in row["partitions"]:
                    rows.append({"queue": name, "partition": part["partition"], "leader": "local",
                                 "replicas": ["local"], "in_sync": ["local"], "epoch": 0, "depth": part["depth"]})
            return rows
        view = node.cluster.coordinator.view
        for name, config in sorted(view.definitions.items()):
            for index in range(config.partitions):
                key = (name, index)
                record, owner = view.records.get(key), view.owners.get(key)
                rows.append({"queue": name, "partition": index, "leader": owner.node if owner else None,
                             "replicas": list(record.replicas) if record else ([owner.node] if owner else []),
                             "in_sync": list(record.isr) if record else ([owner.node] if owner else []),
                             "epoch": owner.epoch if owner else None, "depth": depth.get(key, 0)})
        return rows

    async def dashboard_data(self, request: web.Request) -> web.Response:
        """Everything the dashboard shows, in one answer: members, queues, and the partition map compactly
        (per queue: the leader of each partition as an index into ``nodes``, its replicas and depth)."""
        members = await self._members(request)
        table, missing = await self._queue_table(request)
        rows = await self._partition_rows(request)
        nodes = [m["node"] for m in members]
        index = {n: i for i, n in enumerate(nodes)}
        partitions: dict[str, dict[str, list[Any]]] = {}
        for row in rows:
            entry = partitions.setdefault(row["queue"], {"leader": [], "replicas": [], "depth": []})
            entry["leader"].append(index.get(row["leader"], -1))
            entry["replicas"].append([index.get(n, -1) for n in row["replicas"]])
            entry["depth"].append(row["depth"])
        queues = [{k: row.get(k) for k in ("name", "ready", "unacked", "publish_rate", "deliver_rate",
                                            "dead_lettered")} | {"consumers": len(row["consumers"]),
                                                                 "partitions": len(partitions.get(name, {}).get(
                                                                     "leader", []))}
                  for name, row in sorted(table.items())]
        return web.json_response({"time": time.time(), "node": state.node_id(self.node), "members": members,
                                  "nodes": nodes, "queues": queues, "partitions": partitions,
                                  "unreachable": missing})

    async def dashboard(self, request: web.Request) -> web.Response:
        page = importlib.resources.files("shoalmq.ops").joinpath("dashboard.html").read_text(encoding="utf-8")
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-cache"})

    # -- administration -------------------------------------------------------------------------------------

    async def _admin(self, request: web.Request, path: str, method: str, verb: str, key: str,
                     local: Callable[[], Awaitable[int]]) -> web.Response:
        name = request.match_info["name"]

        async def run() -> dict[str, int]:
            return {key: await local()}

        answers = await self._everyone(method, path, request, run, dict(request.query))
        done = {member: answer[key] for member, (status, answer) in answers.items() if status == 200}
        failed = {member: (answer.get("error") if isinstance(answer, dict) else str(answer))
                  for member, (status, answer) in answers.items() if status != 200}
        statuses = {status for status, _ in answers.values() if status != 200}
        if failed and not done and len(statuses) == 1 and 0 not in statuses:
            return error(statuses.pop(), next(iter(failed.values())), nodes=failed)
        total = sum(done.values())
        body = {"queue": name, key: total, "nodes": done, "failed": failed}
        if done:
            log.info("%s %s: %d message(s) on %d node(s)%s", verb, name, total, len(done),
                     f"; no answer from {', '.join(failed)}" if failed else "")
        return web.json_response(body, status=200 if not failed else 502)

    async def purge(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        assert self.node.queues is not None
        return await self._admin(request, f"/v1/queues/{name}/purge", "POST", "purged", "purged",
                                 lambda: self.node.queues.purge(name))  # type: ignore[union-attr]

    async def redrive(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not name.endswith(DLQ_SUFFIX):
            name += DLQ_SUFFIX  # (the queue's own name stands for its dead-letter queue)
        limit = request.query.get("limit")
        if limit is not None and (not limit.isdigit() or int(limit) < 1):
            return error(400, f"limit must be a positive whole number, got {limit!r}")
        assert self.node.queues is not None
        return await self._admin(request, f"/v1/queues/{request.match_info['name']}/redrive", "POST", "redrove",
                                 "moved", lambda: self.node.queues.redrive(  # type: ignore[union-attr]
                                     name, int(limit) if limit else None))

    async def delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        cluster = self.node.cluster
        if cluster is not None:
            # Refused while a consumer is subscribed on any node that answers (as on a single node); a node without
            # an HTTP server cannot be asked: its consumers keep their subscription, and get the queue again if it
            # is created anew.
            table, missing = await self._queue_table(request)
            row = table.get(name)
            if row is not None and row["consumers"]:
                where = sorted({f"{c['client_id']} on {c['node']}" for c in row["consumers"]})
                raise QueueInUse(f"queue {name!r} has {len(row['consumers'])} consumer(s) ({', '.join(where)}): "
                                 "they must unsubscribe before it is deleted")
            answer = await cluster.coordinator.definitions.delete(name)
            return web.json_response({**answer, "unreachable": missing},
                                     status=200 if not answer["unconfirmed"] else 202)
        assert self.node.queues is not None
        removed = await self.node.queues.delete(name)
        log.info("queue %s deleted with %d message(s)", name, removed)
        return web.json_response({"queue": name, "deleted": True, "messages": removed})

    async def drain(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, True)

    async def undrain(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, False)

    async def _set_draining(self, request: web.Request, draining: bool) -> web.Response:
        cluster = self.node.cluster
        target = request.match_info["node"]
        if cluster is None:
            return error(409, "a single node has no other node to hand its partitions to")
        if target != cluster.node_id:
            address = self._peers().get(target)
            if address is None:
                return error(404, f"no live node {target!r} in cluster {self.config.cluster}")
            status, answer = await self._ask(address, request.method, f"/v1/nodes/{target}/drain", request)
            if status == 0:
                return error(502, answer["error"])
            return web.json_response(answer, status=status)
        if cluster.membership.draining != draining:
            await cluster.membership.update(draining=draining)
            log.info("%s", "draining: this node hands its partitions to the others and takes none"
                     if draining else "no longer draining: this node takes partitions again")
        cluster.coordinator.ownership.wake()
        cluster.coordinator.replicator.reconcile()
        return web.json_response({"node": target, "draining": draining,
                                  "leads": len(cluster.coordinator.view.mine)})


def read_secret_file(path: Any, flag: str) -> str:
    """The first line of a secret file; ConfigError if it cannot be read or is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: {exc}") from None
    secret = text.splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ConfigError(f"{flag} {path}: the file is empty")
    return secret
