"""Shared test helpers: free ports, readiness waits, real etcd and broker processes, and MQTT clients.

Everything runs on loopback with ports the kernel hands out (never 1883 or 2379) and temp directories.
Nothing here sleeps blindly: every wait polls a condition until a deadline and fails with what it waited for.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

RESERVED_PORTS = {1883, 2379, 2380}
BIN_DIR = Path(sys.executable).parent
_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback TCP port, never a well-known broker or etcd port, never the same one twice per run."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RESERVED_PORTS and port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


# -- MQTT on a raw socket (readiness probes; malformed-input tests build on it) ---------------------------

def encode_remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8_field(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str = "", keep_alive: int = 60, clean_session: bool = True,
                   will: tuple[str, bytes, int] | None = None, username: str | None = None,
                   password: str | None = None) -> bytes:
    """A CONNECT packet; ``will`` is (topic, message, qos)."""
    flags = 0x02 if clean_session else 0x00
    payload = _utf8_field(client_id.encode())
    if will is not None:
        topic, message, qos = will
        flags |= 0x04 | (qos << 3)
        payload += _utf8_field(topic.encode()) + _utf8_field(message)
    if username is not None:
        flags |= 0x80
        payload += _utf8_field(username.encode())
    if password is not None:
        flags |= 0x40
        payload += _utf8_field(password.encode())
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", keep_alive) + payload
    return b"\x10" + encode_remaining_length(len(body)) + body


def mqtt_connack(host: str, port: int, timeout: float = 1.0, connect: bytes | None = None,
                 source: str | None = None) -> int | None:
    """Open a TCP connection (from ``source``), send ``connect`` (default: an anonymous CONNECT), and return the
    CONNACK return code (None if none came)."""
    try:
        with socket.create_connection((host, port), timeout=timeout,
                                      source_address=(source, 0) if source else None) as sock:
            sock.sendall(connect or connect_packet(keep_alive=10))
            data = b""
            while len(data) < 4:
                chunk = sock.recv(4 - len(data))
                if not chunk:
                    return None
                data += chunk
            if data[0] != 0x20 or data[1] != 2:
                return None
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            return data[3]
    except OSError:
        return None


# -- processes ------------------------------------------------------------------------------------------

class ManagedProcess:
    """A child process with its output in a log file, stopped with SIGTERM (then SIGKILL) or killed."""

    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = itertools.count()
        self.log_path = self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def spawn(self, env: dict[str, str] | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        log = open(self.log_path, "ab")  # appended across restarts so a test can read the whole history
        log.write(f"==== start {next(self._starts)}: {' '.join(self.command())}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 15.0, env: dict[str, str] | None = None) -> None:
        """Spawn and wait until ready; fails with the log if the process exits or is not ready in time."""
        self.spawn(env)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log}")
            return self.is_ready()

        try:
            wait_until(ready, timeout, f"{self.name} to be ready")
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"{self.name} not ready within {timeout} s:\n{self.log}") from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL, as a crash would. Returns the exit code (-9)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


class BrokerProcess(ManagedProcess):
    """A ``broker`` process on a free loopback port with its own data directory."""

    name = "broker"

    def __init__(self, workdir: Path, args: Sequence[str] = (), port: int | None = None,
                 data_dir: Path | None = None, host: str = "127.0.0.1", prefix: Sequence[str] = (),
                 http_port: int | None = None) -> None:
        """``host``: the address it listens on (and is probed at), its HTTP server too (on ``http_port``, free by
        default, unless the args give ``--http-listen``); ``prefix``: a command it runs under, e.g.
        ``IsolatedHost.command([])`` to run it in a network namespace (the command must exec() the broker)."""
        super().__init__(workdir)
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.host = host
        self.prefix = list(prefix)
        self.data_dir = data_dir or workdir / "data"
        self.args = list(args)
        #: Whether it has a plain listener (``--listen none`` among the args: TLS only).
        self.plain = "--listen" not in self.args or self.args[self.args.index("--listen") + 1] != "none"

    @property
    def http(self) -> str:
        """The base URL of its HTTP server."""
        return f"http://{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        listen = [] if "--listen" in self.args else ["--listen", f"{self.host}:{self.port}"]
        if "--http-listen" not in self.args:
            listen += ["--http-listen", f"{self.host}:{self.http_port}"]
        return [*self.prefix, str(BIN_DIR / "broker"), *listen, "--data-dir", str(self.data_dir), *self.args]

    def is_ready(self) -> bool:
        if self.plain:  # a CONNACK, whatever its code (a broker with a password file refuses the probe)
            return mqtt_connack(self.host, self.port) is not None
        return " ready: " in self.log.rpartition("==== start ")[2]  # (no plain listener to probe)


class EtcdProcess(ManagedProcess):
    """A throwaway single-member etcd (Debian's ``etcd``) on free loopback ports."""

    name = "etcd"

    def __init__(self, workdir: Path, host: str = "127.0.0.1", tls: tuple[Path, Path, Path] | None = None) -> None:
        """``host``: the address clients reach it at (it listens there only; peers stay on loopback). ``tls``:
        (CA, certificate, key): clients must use https and present a certificate the CA signed."""
        super().__init__(workdir)
        self.host = host
        self.tls = tls
        #: etcdctl's --user, once authentication is enabled (``enable_auth``).
        self.root: str | None = None
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = workdir / "etcd-data"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            "etcd", "--name", "t1", "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"t1={peer}", "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
            # Fast elections: ready in ~0.1 s instead of ~0.4 s.
            "--heartbeat-interval", "10", "--election-timeout", "100",
            *(["--trusted-ca-file", str(self.tls[0]), "--cert-file", str(self.tls[1]), "--key-file", str(self.tls[2]),
               "--client-cert-auth"] if self.tls else []),
        ]

    def is_ready(self) -> bool:
        if self.tls:
            try:
                self.etcdctl("endpoint", "health", timeout=5)
                return True
            except (RuntimeError, subprocess.TimeoutExpired):
                return False
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return json.load(response).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def client(self, timeout: float = 5.0) -> Any:
        """An etcd3gw client for this member."""
        import etcd3gw

        return etcd3gw.client(host=self.host, port=self.client_port, api_path="/v3/", timeout=timeout)

    def etcdctl(self, *args: str, timeout: float = 10.0) -> str:
        """Run ``etcdctl`` against this member and return its stdout (raises on a non-zero exit)."""
        secure = [f"--cacert={self.tls[0]}", f"--cert={self.tls[1]}", f"--key={self.tls[2]}"] if self.tls else []
        secure += [f"--user={self.root}"] if self.root else []
        result = subprocess.run(["etcdctl", f"--endpoints={self.endpoint}", *secure, *args], capture_output=True,
                                text=True, timeout=timeout, env={**os.environ, "ETCDCTL_API": "3"})
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def enable_auth(self, users: dict[str, tuple[str, str]]) -> None:
        """Turn etcd's authentication on: a root user, and ``users`` (name -> (password, key prefix)), each with
        a role that may read and write keys under its prefix only."""
        for name, (password, prefix) in users.items():
            self.etcdctl("role", "add", f"{name}-role")
            self.etcdctl("role", "grant-permission", f"{name}-role", "--prefix=true", "readwrite", prefix)
            self.etcdctl("user", "add", f"{name}:{password}")
            self.etcdctl("user", "grant-role", name, f"{name}-role")
        self.etcdctl("user", "add", "root:rootpw")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self.root = "root:rootpw"

    def remove_data(self) -> None:
        # A fresh etcd data dir preallocates ~123 MB of WAL: don't leave them behind in pytest's temp dirs.
        shutil.rmtree(self.data_dir, ignore_errors=True)


# -- MQTT clients ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int


class MqttClient:
    """A paho-mqtt client that waits for every acknowledgement it needs, with a timeout on each."""

    def __init__(self, port: int, client_id: str = "", clean_session: bool = True, manual_ack: bool = False,
                 host: str = "127.0.0.1", keepalive: int = 60, timeout: float = 10.0) -> None:
        self.host, self.port, self.keepalive, self.timeout = host, port, keepalive, timeout
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                                  manual_ack=manual_ack)
        self.messages: queue.Queue[Received] = queue.Queue()
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._suback: dict[int, list[Any]] = {}
        self._suback_event = threading.Condition()
        self.connect_reason: Any = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connect_reason = reason
        self._disconnected.clear()
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connected.clear()
        self._disconnected.set()

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, msg.payload, msg.qos, bool(msg.retain), bool(msg.dup), msg.mid))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: list[Any], properties: Any) -> None:
        with self._suback_event:
            self._suback[mid] = reason_codes
            self._suback_event.notify_all()

    def connect(self) -> MqttClient:
        self.client.connect(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if not self._connected.wait(self.timeout):
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port} within {self.timeout} s")
        if self.connect_reason.is_failure:
            raise ConnectionError(f"CONNECT refused: {self.connect_reason}")
        return self

    def subscribe(self, topic: str, qos: int = 1) -> list[Any]:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        result, mid = self.client.subscribe(topic, qos)
        if result != paho.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"SUBSCRIBE not sent: {paho.error_string(result)}")
        with self._suback_event:
            if not self._suback_event.wait_for(lambda: mid in self._suback, self.timeout):
                raise TimeoutError(f"no SUBACK for {topic!r} within {self.timeout} s")
            return self._suback.pop(mid)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1 and 2, wait until the broker has acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise TimeoutError(f"publish to {topic!r} not acknowledged within {self.timeout} s (rc {info.rc})")

    def ack(self, message: Received) -> None:
        """PUBACK a message received with ``manual_ack=True``."""
        self.client.ack(message.mid, message.qos)

    def expect(self, count: int, timeout: float | None = None) -> list[Received]:
        """Wait for ``count`` more messages; TimeoutError (with what did arrive) if they don't all come."""
        deadline = time.monotonic() + (timeout or self.timeout)
        got: list[Received] = []
        while len(got) < count:
            remaining = deadline - time.monotonic()
            try:
                got.append(self.messages.get(timeout=max(remaining, 0.001)))
            except queue.Empty:
                raise TimeoutError(f"received {len(got)} of {count} messages: {got[:5]}") from None
        return got

    def no_message(self, within: float) -> bool:
        """True if no message arrives within ``within`` s (a deliberate wait for a negative check)."""
        try:
            self.messages.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def wait_disconnected(self, timeout: float | None = None) -> bool:
        return self._disconnected.wait(timeout or self.timeout)

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mosquitto_pub(port: int, topic: str, message: str | bytes, qos: int = 1, *extra: str,
                  timeout: float = 10.0) -> subprocess.CompletedProcess[bytes]:
    """Run ``mosquitto_pub`` once against a broker; returns the completed process (check its returncode)."""
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", str(qos), *extra]
    if isinstance(message, str):
        message = message.encode()
    return subprocess.run([*cmd, "-s"], input=message, capture_output=True, timeout=timeout)


class MosquittoSub:
    """A running ``mosquitto_sub``: started, ready once its SUBACK arrived, its messages read line by line."""

    def __init__(self, port: int, topic: str, qos: int = 1, *extra: str) -> None:
        # -d prints protocol events (we wait for "received SUBACK"); -v prefixes each message with its topic.
        # stdbuf: mosquitto_sub block-buffers stdout into a pipe, which would hide its lines until it exits.
        self.cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", str(qos), "-v", "-d",
                    *extra]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.debug: list[str] = []
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("Client ") and (" received " in line or " sending " in line):
                self.debug.append(line)
                if "received SUBACK" in line:
                    self._subscribed.set()
            elif line.startswith("Subscribed (mid"):
                self.debug.append(line)
            else:
                self._lines.put(line)
        self._lines.put(None)

    def wait_subscribed(self, timeout: float = 10.0) -> MosquittoSub:
        if not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"mosquitto_sub got no SUBACK within {timeout} s: {self.debug}")
        return self

    def lines(self, count: int, timeout: float = 10.0) -> list[str]:
        """The next ``count`` message lines (``"<topic> <payload>"``)."""
        deadline = time.monotonic() + timeout
        out: list[str] = []
        while len(out) < count:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise TimeoutError(f"mosquitto_sub printed {len(out)} of {count} messages: {out}") from None
            if line is None:
                raise EOFError(f"mosquitto_sub exited ({self.proc.poll()}) after {out}; debug: {self.debug[-5:]}")
            out.append(line)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> MosquittoSub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()



# -- a raw-socket MQTT client, for what paho hides: packet ids, DUP flags, silence, abrupt death ------------------

@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    body: bytes

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    def publish_fields(self) -> tuple[str, int | None, bytes]:
        """(topic, packet id or None, payload) of a PUBLISH."""
        (topic_len,) = struct.unpack_from("!H", self.body, 0)
        topic = self.body[2:2 + topic_len].decode()
        pos = 2 + topic_len
        packet_id = None
        if self.qos:
            (packet_id,) = struct.unpack_from("!H", self.body, pos)
            pos += 2
        return topic, packet_id, self.body[pos:]


def publish_packet(topic: str, payload: bytes, qos: int = 1, packet_id: int = 1, dup: bool = False) -> bytes:
    body = _utf8_field(topic.encode()) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1) | (0x08 if dup else 0)]) + encode_remaining_length(len(body)) + body


def subscribe_packet(topic_filter: str, qos: int = 1, packet_id: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + _utf8_field(topic_filter.encode()) + bytes([qos])
    return b"\x82" + encode_remaining_length(len(body)) + body


def puback_packet(packet_id: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", packet_id)


class RawMqtt:
    """A minimal MQTT 3.1.1 client on a blocking socket."""

    def __init__(self, port: int, client_id: str = "", keep_alive: int = 60, clean_session: bool = True,
                 host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        self._early: list[Frame] = []
        self.sock.sendall(connect_packet(client_id, keep_alive=keep_alive, clean_session=clean_session))
        connack = self.read()
        if connack.type != 2 or connack.body[1] != 0:
            raise ConnectionError(f"CONNECT refused: {connack}")
        #: CONNACK's session present flag [MQTT-3.2.2-2].
        self.session_present = bool(connack.body[0] & 1)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float | None = None) -> Frame:
        """The next frame; TimeoutError if none within ``timeout``, EOFError if the broker closed."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no frame from the broker in time") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise EOFError("the broker closed the connection")
            self._buffer += chunk

    def _parse(self) -> Frame | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        length, multiplier, pos = 0, 1, 1
        while True:
            if pos >= len(buf):
                return None
            byte = buf[pos]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            pos += 1
            if not byte & 0x80:
                break
        if len(buf) < pos + length:
            return None
        self._buffer = buf[pos + length:]
        return Frame(buf[0] >> 4, buf[0] & 0x0F, buf[pos:pos + length])

    def subscribe(self, topic_filter: str, qos: int = 1, packet_id: int = 1) -> int:
        """Subscribe and return the granted QoS (0x80: refused); frames before the SUBACK are kept."""
        self.send(subscribe_packet(topic_filter, qos, packet_id))
        early: list[Frame] = []
        while True:
            frame = self.read()
            if frame.type == 9:
                self._early = early
                return frame.body[2]
            early.append(frame)

    def publishes(self, count: int, timeout: float = 10.0) -> list[Frame]:
        """The next ``count`` PUBLISH frames (including any that came before the SUBACK)."""
        out = [f for f in self._early if f.type == 3]
        self._early = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"got {len(out)} of {count} publishes")
            frame = self.read(remaining)
            if frame.type == 3:
                out.append(frame)
        return out

    def closed_by_broker(self, timeout: float) -> bool:
        """True if the broker closes the connection within ``timeout`` (frames meanwhile are discarded)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.read(max(deadline - time.monotonic(), 0.01))
        except EOFError:
            return True
        except (TimeoutError, OSError):
            return False
        return False

    def close(self) -> None:
        self.sock.close()
