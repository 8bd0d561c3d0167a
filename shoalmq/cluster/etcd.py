"""A small etcd v3 client on etcd3gw: bytes in and out, timeouts, endpoint rotation, and a watch that resumes.

etcd3gw is blocking (requests underneath), so every call runs on a dedicated thread pool, never the event loop's.
It talks to etcd's JSON gateway; this module speaks the gateway's JSON (base64 keys and values, revisions as
strings) itself where etcd3gw's helpers fall short:

- etcd3gw has no failover: ``Etcd`` rotates through its endpoints when one refuses or times out.
- etcd3gw's watch thread dies silently when etcd restarts or the stream breaks, and a watch from a compacted
  revision is silently dead. ``PrefixWatch`` reconnects from the last revision it saw after any error and after a
  few seconds of silence (a stream can hang without an error), and on compaction re-lists the prefix and hands the
  caller a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_exceptions

from shoalmq.errors import ConfigError, ShoalError

log = logging.getLogger(__name__)


class EtcdUnavailable(ShoalError):
    """No etcd endpoint answered."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix`` (etcd's convention)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\x00"
    end[-1] += 1
    return bytes(end)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(_unb64(raw.get("key")), _unb64(raw.get("value")), int(raw.get("mod_revision", 0)),
                    int(raw.get("create_revision", 0)), int(raw.get("lease", 0)))


def parse_endpoints(text: str) -> list[str]:
    """``http://h:p,http://h2:p2`` (or ``h:p``) into a list of base URLs; ValueError if one is malformed."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "://" not in part:
            part = "http://" + part
        url = urlsplit(part)
        if url.scheme not in ("http", "https") or not url.hostname or not url.port:
            raise ValueError(f"bad etcd endpoint {part!r}: expected http://HOST:PORT")
        out.append(f"{url.scheme}://{url.hostname}:{url.port}")
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd securely: TLS (``https://`` endpoints; ``cafile`` to verify etcd, ``certfile`` and
    ``keyfile`` for a client certificate) and etcd's own authentication (``user`` and its password)."""

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    user: str | None = None
    password: str | None = None


def etcd_access(cafile: Any = None, certfile: Any = None, keyfile: Any = None, user: str | None = None,
                password_file: Any = None) -> EtcdAccess:
    """The ``EtcdAccess`` of the settings; the password from ``password_file`` (its first line) or the environment
    variable SHOALMQ_ETCD_PASSWORD, never a flag (a flag's value shows in ``ps``). ConfigError if unreadable."""
    password = None
    if user is not None:
        if password_file is not None:
            try:
                text = Path(password_file).read_text(encoding="utf-8")
                password = text.splitlines()[0] if text else ""
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--etcd-password-file {password_file}: {exc}") from None
        else:
            password = os.environ.get("SHOALMQ_ETCD_PASSWORD")
            if password is None:
                raise ConfigError("--etcd-user needs a password: --etcd-password-file, or SHOALMQ_ETCD_PASSWORD")
    return EtcdAccess(str(cafile) if cafile else None, str(certfile) if certfile else None,
                      str(keyfile) if keyfile else None, user, password)


#: etcd's answers to a request whose token is missing, expired or from before an etcd restart.
_TOKEN_ERRORS = ("invalid auth token", "user name is empty", "auth: revision in header is old")


class Etcd:
    """etcd v3 over etcd3gw, with failover between endpoints. Blocking methods end in ``_sync``; ``call`` runs one
    on the client's threads from the event loop. With ``access.user``, every request carries a token from etcd's
    ``/v3/auth/authenticate``, fetched again when etcd says it is no longer valid (an etcd restart)."""

    def __init__(self, endpoints: list[str], timeout: float = 2.0, access: EtcdAccess | None = None) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self.access = access or EtcdAccess()
        self._current = 0
        self._lock = threading.Lock()
        #: Requests that failed (etcd unreachable, or refused them).
        self.errors = 0
        #: Log when etcd becomes unreachable and when it answers again (a node does; a command does not).
        self.report_outages = False
        self._lost_since: float | None = None
        self._clients = [self._client(url) for url in endpoints]
        self._executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="shoalmq-etcd")

    def _client(self, url: str) -> etcd3gw.Etcd3Client:
        parts = urlsplit(url)
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE and proxies from the environment must not apply
        access = self.access
        if access.cafile:
            session.verify = access.cafile
        if access.certfile and access.keyfile:
            session.cert = (access.certfile, access.keyfile)
        return etcd3gw.Etcd3Client(host=parts.hostname or "", port=parts.port or 2379, protocol=parts.scheme,
                                   timeout=self.timeout, api_path="/v3/", session=session)

    def _authenticate(self, client: etcd3gw.Etcd3Client) -> None:
        """A fresh token for ``client``'s requests; ShoalError if etcd refuses the user."""
        client.session.headers.pop("Authorization", None)
        try:
            result = client.post(client.get_url("/auth/authenticate"),
                                 json={"name": self.access.user, "password": self.access.password or ""})
        except etcd_exceptions.Etcd3Exception as exc:
            detail = getattr(exc, "detail_text", None) or str(exc)
            raise ShoalError(f"etcd refused user {self.access.user!r}: {detail}") from None
        client.session.headers["Authorization"] = result["token"]

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def request_sync(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the gateway, trying each endpoint once (starting with the last one that worked)."""
        errors = []
        for attempt in range(len(self._clients)):
            with self._lock:
                index = (self._current + attempt) % len(self._clients)
            client = self._clients[index]
            try:
                if self.access.user and "Authorization" not in client.session.headers:
                    self._authenticate(client)
                try:
                    result = client.post(client.get_url(path), json=body)
                except etcd_exceptions.Etcd3Exception as exc:
                    detail = getattr(exc, "detail_text", None) or str(exc)
                    if not self.access.user or not any(text in detail for text in _TOKEN_ERRORS) or isinstance(
                            exc, (etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError)):
                        raise
                    log.info("etcd no longer knows this node's token (%s): authenticating again as %s", detail,
                             self.access.user)
                    self._authenticate(client)  # (the token died with an etcd restart, or expired): once more
                    result = client.post(client.get_url(path), json=body)
            except (etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError) as exc:
                errors.append(f"{self.endpoints[index]}: {type(exc).__name__}")
                continue
            except etcd_exceptions.Etcd3Exception as exc:
                self.errors += 1
                raise ShoalError(f"etcd refused {path}: {getattr(exc, 'detail_text', None) or exc}") from None
            with self._lock:
                self._current = index
                lost, self._lost_since = self._lost_since, None
            if lost is not None and self.report_outages:
                log.info("etcd reachable again at %s after %.1f s", self.endpoints[index], time.monotonic() - lost)
            return result
        self.errors += 1
        with self._lock:
            first, self._lost_since = self._lost_since is None, self._lost_since or time.monotonic()
        if first and self.report_outages:
            log.warning("etcd unreachable (%s): retrying", "; ".join(errors))
        raise EtcdUnavailable(f"etcd unreachable ({'; '.join(errors)})")

    # -- key-value ----------------------------------------------------------------------------------------

    def get_prefix_sync(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the store revision they were read at."""
        result = self.request_sync("/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return [_kv(raw) for raw in result.get("kvs", [])], int(result["header"]["revision"])

    def get_sync(self, key: bytes) -> KeyValue | None:
        result = self.request_sync("/kv/range", {"key": _b64(key)})
        kvs = result.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def put_sync(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.request_sync("/kv/put", body)["header"]["revision"])

    def delete_sync(self, key: bytes) -> None:
        self.request_sync("/kv/deleterange", {"key": _b64(key)})

    def delete_prefix_sync(self, prefix: bytes) -> None:
        self.request_sync("/kv/deleterange", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})

    def create_sync(self, key: bytes, value: bytes, lease: int = 0,
                    unless: bytes | None = None) -> tuple[bool, KeyValue | None]:
        """Put ``key`` only if it does not exist (and, with ``unless``, neither does that key). Returns (created,
        the existing entry if not; None if it is ``unless`` that exists)."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        compare = [{"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}]
        if unless is not None:
            compare.append({"key": _b64(unless), "result": "EQUAL", "target": "CREATE", "create_revision": "0"})
        result = self.request_sync("/kv/txn", {
            "compare": compare,
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        if result.get("succeeded"):  # absent, not false, when the compare fails
            return True, None
        kvs = result["responses"][0]["response_range"].get("kvs", [])
        return False, (_kv(kvs[0]) if kvs else None)

    def put_while_sync(self, key: bytes, value: bytes, lease: int, guard: bytes) -> bool:
        """Put ``key`` on ``lease`` only while ``guard`` exists."""
        result = self.request_sync("/kv/txn", {
            "compare": [{"key": _b64(guard), "result": "GREATER", "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}],
        })
        return bool(result.get("succeeded"))

    def delete_queue_sync(self, definition: bytes, created: int, marker: bytes, marker_value: bytes, lease: int,
                          tombstone: bytes, tombstone_value: bytes) -> bool:
        """In one transaction, if the definition key is still the one created at ``created`` and no ``marker``
        exists: delete the definition, put ``marker`` on ``lease`` and ``tombstone`` (no lease)."""
        result = self.request_sync("/kv/txn", {
            "compare": [{"key": _b64(definition), "result": "EQUAL", "target": "CREATE",
                         "create_revision": str(created)},
                        {"key": _b64(marker), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_delete_range": {"key": _b64(definition)}},
                        {"request_put": {"key": _b64(marker), "value": _b64(marker_value), "lease": str(lease)}},
                        {"request_put": {"key": _b64(tombstone), "value": _b64(tombstone_value)}}],
        })
        return bool(result.get("succeeded"))

    def claim_sync(self, key: bytes, value: bytes, lease: int) -> tuple[int, KeyValue | None]:
        """Create ``key`` on ``lease`` if it does not exist. Returns (the revision it was created at, None), or
        (0, the existing entry) if it exists (None if it vanished meanwhile)."""
        result = self.request_sync("/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        if result.get("succeeded"):
            return int(result["header"]["revision"]), None
        kvs = result["responses"][0]["response_range"].get("kvs", [])
        return 0, (_kv(kvs[0]) if kvs else None)

    def put_if_created_at_sync(self, key: bytes, value: bytes, lease: int, create_revision: int) -> bool:
        """Overwrite ``key`` (keeping ``lease``) only if it is still the key created at ``create_revision``."""
        result = self.request_sync("/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE",
                         "create_revision": str(create_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}],
        })
        return bool(result.get("succeeded"))

    def put_if_revision_sync(self, key: bytes, value: bytes, mod_revision: int) -> tuple[int, KeyValue | None]:
        """Write ``key`` (no lease) only if its last change was at ``mod_revision`` (0: only if it does not exist):
        the compare-and-swap every replicated partition record is changed with. Returns (the revision written, None)
        or (0, the entry as it is now; None if absent)."""
        result = self.request_sync("/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(mod_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        if result.get("succeeded"):
            return int(result["header"]["revision"]), None
        kvs = result["responses"][0]["response_range"].get("kvs", [])
        return 0, (_kv(kvs[0]) if kvs else None)

    def delete_if_created_at_sync(self, key: bytes, create_revision: int) -> bool:
        """Delete ``key`` only if it is still the key created at ``create_revision`` (nobody else's since)."""
        result = self.request_sync("/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE",
                         "create_revision": str(create_revision)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        })
        return bool(result.get("succeeded"))

    def compact_sync(self, revision: int) -> None:
        self.request_sync("/kv/compaction", {"revision": str(revision), "physical": True})

    # -- leases -------------------------------------------------------------------------------------------

    def grant_sync(self, ttl: int) -> int:
        return int(self.request_sync("/lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive_sync(self, lease: int) -> int:
        """Refresh a lease; its new TTL, or -1 if it has expired."""
        result = self.request_sync("/lease/keepalive", {"ID": str(lease)})
        return int(result.get("result", {}).get("TTL", -1))

    def revoke_sync(self, lease: int) -> None:
        self.request_sync("/kv/lease/revoke", {"ID": str(lease)})

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        for client in self._clients:
            client.session.close()


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" or "delete"
    kv: KeyValue


class PrefixWatch:
    """Watches a prefix from a thread and hands batches of changes to the event loop.

    ``on_snapshot(kvs)`` is called first with the current keys, and again whenever the watch had to re-list
    (after a compaction); ``on_events(events)`` with each batch of changes in between. Both run in the loop.
    """

    #: Seconds without any data after which the stream is re-created (from the last revision): a stream can hang
    #: silently when etcd restarts.
    IDLE_RECONNECT = 3.0
    RETRY_DELAY = 0.2

    def __init__(self, etcd: Etcd, prefix: bytes, on_snapshot: Callable[[list[KeyValue]], None],
                 on_events: Callable[[list[WatchEvent]], None]) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self._on_snapshot = on_snapshot
        self._on_events = on_events
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._response: requests.Response | None = None
        self._thread = threading.Thread(target=self._run, name="shoalmq-watch", daemon=True)
        self.revision = 0  # the last revision seen (events up to it are delivered)
        self.reconnects = 0
        self.relists = 0

    async def start(self) -> None:
        """List the prefix (``on_snapshot`` runs before this returns), then watch from there."""
        kvs, revision = await self.etcd.call(self.etcd.get_prefix_sync, self.prefix)
        self.revision = revision
        self._on_snapshot(kvs)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, without blocking: the watch thread is woken by shutting its socket down (closing the
        response from here would wait for the lock the thread holds while it reads)."""
        self._stop.set()
        response = self._response
        connection = getattr(response.raw, "_connection", None) if response is not None else None
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._stream_once()
            except Exception as exc:  # any failure: reconnect from the last revision
                if self._stop.is_set():
                    return
                log.debug("watch on %r broke (%s); resuming from revision %d", self.prefix, exc, self.revision + 1)
            if self._stop.wait(self.RETRY_DELAY):
                return
            self.reconnects += 1

    def _stream_once(self) -> None:
        url = self.etcd.endpoint + "/v3/watch"
        body = {"create_request": {"key": _b64(self.prefix), "range_end": _b64(prefix_end(self.prefix)),
                                   "start_revision": str(self.revision + 1)}}
        session = self.etcd._clients[self.etcd._current].session
        try:
            response = session.post(url, json=body, stream=True, timeout=(self.etcd.timeout, self.IDLE_RECONNECT))
        except requests.RequestException:
            self._rotate()
            raise
        self._response = response
        try:
            for line in response.iter_lines(chunk_size=None):
                if self._stop.is_set():
                    return
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:  # (e.g. a token etcd no longer knows: the next request renews it)
                    raise RuntimeError(f"watch refused: {message['error'].get('message', message['error'])}")
                result = message.get("result", {})
                if int(result.get("compact_revision", 0) or 0) > 0:
                    self._relist()
                    return
                if result.get("canceled"):
                    raise RuntimeError(f"watch canceled: {result.get('cancel_reason', '')}")
                events = [WatchEvent("delete" if e.get("type") == "DELETE" else "put", _kv(e["kv"]))
                          for e in result.get("events", [])]
                if events:
                    self.revision = max(self.revision, max(e.kv.mod_revision for e in events))
                    self._loop.call_soon_threadsafe(self._on_events, events)
        finally:
            response.close()
            self._response = None

    def _relist(self) -> None:
        kvs, revision = self.etcd.get_prefix_sync(self.prefix)
        self.revision = revision
        self.relists += 1
        log.info("watch on %r was compacted past; re-listed %d key(s) at revision %d", self.prefix, len(kvs),
                 revision)
        self._loop.call_soon_threadsafe(self._on_snapshot, kvs)

    def _rotate(self) -> None:
        with self.etcd._lock:
            self.etcd._current = (self.etcd._current + 1) % len(self.etcd.endpoints)
