"""MQTT 3.1.1 on a raw TCP socket: the packets the load tool sends, and the handshakes it waits for.

Only the connection set-up (CONNECT/CONNACK, SUBSCRIBE/SUBACK, PINGREQ/PINGRESP) lives here; the hot loops in
``workers.py`` parse PUBLISH and PUBACK frames inline, many per ``recv``, because a function call per frame would
cost more than the parsing itself.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

# Fixed-header first bytes.
CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBSCRIBE = 0x82  # SUBSCRIBE's reserved flags are 0b0010
SUBACK = 0x90
PINGREQ_PACKET = b"\xc0\x00"
PINGRESP = 0xD0
DISCONNECT_PACKET = b"\xe0\x00"

CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


class BrokerError(Exception):
    """Anything wrong on the broker's side of the connection; its message is one line for the user."""


def encode_remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_remaining_length(data: bytes, pos: int) -> tuple[int, int] | None:
    """Decode the remaining length of the frame starting at ``pos``: (length, fixed-header size), or None if
    the buffer ends inside it. BrokerError if it is longer than MQTT's four bytes."""
    value = 0
    shift = 0
    i = pos + 1
    end = len(data)
    while i < end:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i - pos
        shift += 7
        if shift > 21:
            raise BrokerError("malformed packet from the broker (remaining length over 4 bytes)")
    return None


def _string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, keep_alive: int, clean_session: bool = True) -> bytes:
    body = b"\x00\x04MQTT\x04" + bytes([0x02 if clean_session else 0x00]) + struct.pack("!H", keep_alive)
    body += _string(client_id.encode())
    return bytes([CONNECT]) + encode_remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _string(topic_filter.encode()) + bytes([qos])
    return bytes([SUBSCRIBE]) + encode_remaining_length(len(body)) + body


def publish_prefix(topic: str, qos: int, payload_size: int) -> bytes:
    """A PUBLISH frame up to (not including) the packet identifier: fixed header, remaining length, topic."""
    topic_bytes = topic.encode()
    remaining = 2 + len(topic_bytes) + (2 if qos else 0) + payload_size
    return bytes([PUBLISH | (qos << 1)]) + encode_remaining_length(remaining) + _string(topic_bytes)


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the broker"
    if isinstance(exc, BrokenPipeError):
        return "the broker closed the connection"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


class Connection:
    """One MQTT connection: a blocking socket plus the bytes received but not parsed yet (``pending``)."""

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self.sock = sock
        self.where = f"{host}:{port}"
        self.pending = b""

    @classmethod
    def open(cls, host: str, port: int, client_id: str, keep_alive: int, timeout: float,
             cafile: str | None = None) -> Connection:
        """Connect (over TLS, verifying the broker with ``cafile``, if given) and wait for a successful CONNACK,
        all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            if cafile is not None:
                sock = ssl.create_default_context(cafile=cafile).wrap_socket(sock, server_hostname=host)
        except socket.gaierror as exc:
            raise BrokerError(f"cannot resolve host {host!r}: {exc.strerror}") from None
        except OSError as exc:
            if isinstance(exc, (socket.timeout, TimeoutError)):
                raise BrokerError(f"cannot connect to {host}:{port}: no answer within {timeout:g} s") from None
            raise BrokerError(f"cannot connect to {host}:{port}: {describe_os_error(exc)}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(sock, host, port)
        try:
            conn.send(connect_packet(client_id, keep_alive))
            first, body = conn.read_packet(deadline, "CONNACK")
            if first != CONNACK or len(body) != 2:
                raise BrokerError(f"broker at {conn.where} answered CONNECT with packet type {first >> 4}, "
                                  "not CONNACK")
            if body[1] != 0:
                reason = CONNACK_REASONS.get(body[1], "unknown reason")
                raise BrokerError(f"broker at {conn.where} refused the connection: {reason} "
                                  f"(CONNACK return code {body[1]})")
        except BaseException:
            conn.close()
            raise
        return conn

    def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise BrokerError(f"connection to {self.where} lost: {describe_os_error(exc)}") from None

    def read_packet(self, deadline: float, waiting_for: str) -> tuple[int, bytes]:
        """The next whole packet as (first byte, body), waiting until ``deadline`` (time.monotonic())."""
        while True:
            data = self.pending
            if len(data) >= 2:
                decoded = decode_remaining_length(data, 0)
                if decoded is not None:
                    length, header = decoded
                    if len(data) >= header + length:
                        self.pending = data[header + length:]
                        return data[0], data[header:header + length]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(f"no {waiting_for} from {self.where} within the connect timeout")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError as exc:
                raise BrokerError(f"connection to {self.where} lost while waiting for {waiting_for}: "
                                  f"{describe_os_error(exc)}") from None
            if not chunk:
                raise BrokerError(f"broker at {self.where} closed the connection while the load tool waited for "
                                  f"{waiting_for}")
            self.pending += chunk

    def subscribe(self, topic_filter: str, qos: int, timeout: float) -> int:
        """SUBSCRIBE and wait for its SUBACK; returns the granted QoS. Messages that arrive first stay in
        ``pending`` for the caller (a queue may hold a backlog)."""
        deadline = time.monotonic() + timeout
        self.send(subscribe_packet(1, topic_filter, qos))
        skipped = b""
        try:
            while True:
                first, body = self.read_packet(deadline, "SUBACK")
                if first == SUBACK and body[:2] == b"\x00\x01" and len(body) == 3:
                    granted = body[2]
                    if granted == 0x80:
                        raise BrokerError(f"broker at {self.where} refused the subscription to {topic_filter!r}")
                    return granted
                # Anything else (a PUBLISH of a backlog, say) is kept, re-encoded, for the hot loop.
                skipped += bytes([first]) + encode_remaining_length(len(body)) + body
        finally:
            self.pending = skipped + self.pending

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def disconnect(self) -> None:
        """Send DISCONNECT (best effort) and close."""
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(DISCONNECT_PACKET)
        except OSError:
            pass
        self.close()
