"""The publisher and consumer processes: each one MQTT connection on a raw socket, with its hot loop.

Every message's payload starts with ``HEADER`` (20 bytes, big-endian), then zero padding up to ``--size``:

    run id     u32   random per run: deliveries left over from another run are told apart ("foreign")
    key        u64   publisher index << 32 | sequence number within that publisher (0, 1, 2, ...)
    sent at    u64   time.perf_counter_ns() just before the send() that carried it (CLOCK_MONOTONIC on Linux,
                     one clock for every process of the machine)

A worker talks to the parent through ``control`` (a multiprocessing queue): ``("ready", role, index)`` once
connected (consumers: once their SUBACK came), then ``("result", role, index, dict)``, or ``("error", text)``
with a one-line description instead.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import time
import traceback
from array import array
from dataclasses import dataclass
from typing import Any

from bench.loadtool.mqtt import (
    PINGREQ_PACKET,
    BrokerError,
    Connection,
    decode_remaining_length,
    describe_os_error,
    publish_prefix,
)

HEADER = struct.Struct("!IQQ")
HEADER_SIZE = HEADER.size  # 20
KEEP_ALIVE = 60  # seconds, in CONNECT; a worker sends PINGREQ after KEEP_ALIVE / 2 without sending anything
POLL = 0.2  # seconds a blocked recv waits before the worker checks its stop conditions
SEND_CHUNK = 1 << 20  # most bytes of PUBLISH frames packed into one send


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    topic: str
    sub_topic: str
    qos: int
    size: int
    window: int
    client_prefix: str
    drain_timeout: float
    connect_timeout: float
    run_id: int
    per_publisher: tuple[int, ...]  # messages each publisher sends
    consumers: int
    rate: float = 0.0  # messages per second for each publisher; 0: as fast as the window allows
    fan_out: bool = False  # every consumer gets every message (an ordinary topic), not one of the consumers
    cafile: str | None = None  # TLS to the broker, verified with this CA


#: What a socket read or write with a timeout raises when nothing could be done yet (TLS: a record incomplete).
WOULD_BLOCK = (BlockingIOError, socket.timeout, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _kernel_timeouts(sock: socket.socket) -> None:
    """Blocking socket whose recv/send give up after POLL seconds (EAGAIN, raised as BlockingIOError).

    Python's own socket timeout would poll() before every recv and send: one more system call per batch. Over
    TLS that timeout it is (a record read in part would otherwise look like a closed connection)."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(POLL)
        return
    sock.settimeout(None)
    timeval = struct.pack("ll", int(POLL), int(POLL % 1 * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _send_all(conn: Connection, data: bytes | memoryview, stall: float) -> None:
    """Send everything; the socket has a short timeout, so a broker that stops reading for ``stall`` seconds
    is an error rather than a hang."""
    sock = conn.sock
    view = memoryview(data)
    blocked_since = 0.0
    while view:
        try:
            sent = sock.send(view)
        except WOULD_BLOCK:
            now = time.monotonic()
            if not blocked_since:
                blocked_since = now
            elif now - blocked_since > stall:
                raise BrokerError(f"broker at {conn.where} stopped reading for {stall:g} s") from None
            continue
        except OSError as exc:
            raise BrokerError(f"connection to {conn.where} lost: {describe_os_error(exc)}") from None
        view = view[sent:]
        blocked_since = 0.0


def _worker(role: str, index: int, control: Any, body: Any, *args: Any) -> None:
    """Run ``body`` and turn any failure into one ``("error", line)`` message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends the workers
    try:
        body(index, control, *args)
    except BrokerError as exc:
        control.put(("error", f"{role} {index}: {exc}"))
    except Exception as exc:  # a bug in the tool: still one line, with where it happened
        where = traceback.extract_tb(exc.__traceback__)[-1]
        control.put(("error", f"{role} {index}: internal error {type(exc).__name__}: {exc} "
                              f"({os.path.basename(where.filename)}:{where.lineno})"))


# -- publishers ----------------------------------------------------------------------------------------------

def publisher_main(index: int, control: Any, settings: Settings, go: Any) -> None:
    _worker("publisher", index, control, _publisher, settings, go)


def _publisher(index: int, control: Any, settings: Settings, go: Any) -> None:
    conn = Connection.open(settings.host, settings.port, f"{settings.client_prefix}-pub-{index}", KEEP_ALIVE,
                           settings.connect_timeout, settings.cafile)
    control.put(("ready", "publisher", index))
    go.wait()
    try:
        result = _publish(conn, index, settings)
    finally:
        conn.disconnect()
    control.put(("result", "publisher", index, result))


def _publish(conn: Connection, index: int, settings: Settings) -> dict[str, Any]:
    cpu_start = _cpu()
    n = settings.per_publisher[index]
    qos = settings.qos
    window = settings.window
    stall = settings.drain_timeout
    run_id = settings.run_id
    sock = conn.sock
    _kernel_timeouts(sock)

    prefix = publish_prefix(settings.topic, qos, settings.size)
    frame_size = len(prefix) + (2 if qos else 0) + settings.size
    per_send = max(1, min(window, SEND_CHUNK // frame_size))
    frame = prefix + bytes(frame_size - len(prefix))
    buf = bytearray(frame * per_send)
    view = memoryview(buf)
    offset0 = len(prefix)
    pack_into = struct.Struct("!HIQQ" if qos else "!IQQ").pack_into
    key_base = index << 32
    perf_ns = time.perf_counter_ns
    monotonic = time.monotonic

    slots = [-1] * 65536  # packet id -> sequence number in flight
    acked = bytearray(n)
    next_id = 1
    seq = 0
    inflight = 0
    nacked = 0
    t_first = 0
    t_end = 0
    stalled = False
    data = b""
    last_progress = last_send = monotonic()
    rate = settings.rate
    paced_from = monotonic()

    while True:
        # Send as many as the window allows, up to per_send frames per send() (and, when paced, as the schedule
        # allows: message i is due at i / rate seconds).
        room = window - inflight if qos else per_send
        k = min(room, per_send, n - seq)
        paced = False
        if rate and k > 0:
            due = int((monotonic() - paced_from) * rate) + 1 - seq
            if due < k:
                k, paced = max(due, 0), True
        if k > 0:
            ts = perf_ns()
            if not t_first:
                t_first = ts
            o = offset0
            if qos:
                for _ in range(k):
                    pid = next_id
                    while slots[pid] >= 0:  # only if one message stayed unacknowledged for 65,535 others
                        pid = pid % 65535 + 1
                    slots[pid] = seq
                    next_id = pid % 65535 + 1
                    pack_into(buf, o, pid, run_id, key_base | seq, ts)
                    o += frame_size
                    seq += 1
            else:
                for _ in range(k):
                    pack_into(buf, o, run_id, key_base | seq, ts)
                    o += frame_size
                    seq += 1
            _send_all(conn, view[:k * frame_size], stall)
            inflight += k
            last_send = monotonic()
            if seq < n and (qos == 0 or inflight < window) and not paced:
                continue
        if qos == 0:
            if seq >= n:
                break
            if paced:
                time.sleep(max(0.0, (seq + 1) / rate - (monotonic() - paced_from)))
            continue
        if inflight == 0:
            if seq >= n or not rate:
                break
            time.sleep(max(0.0, (seq + 1) / rate - (monotonic() - paced_from)))  # paced: wait for the next one
            continue

        # Window full (or everything sent): read PUBACKs, as many as have arrived.
        try:
            chunk = sock.recv(65536)
        except WOULD_BLOCK:
            now = monotonic()
            if now - last_progress > stall:
                stalled = True
                break
            if now - last_send > KEEP_ALIVE / 2:
                _send_all(conn, PINGREQ_PACKET, stall)
                last_send = now
            continue
        except OSError as exc:
            raise BrokerError(f"connection to {conn.where} lost after {nacked} PUBACKs: "
                              f"{describe_os_error(exc)}") from None
        if not chunk:
            raise BrokerError(f"broker at {conn.where} closed the connection after {nacked} PUBACKs "
                              f"({inflight} messages in flight)")
        data = data + chunk if data else chunk
        end = len(data)
        p = 0
        got = 0
        while p + 2 <= end:
            if data[p] == 0x40 and data[p + 1] == 2:  # PUBACK, the common case
                if p + 4 > end:
                    break
                s = slots[(data[p + 2] << 8) | data[p + 3]]
                if s >= 0:
                    slots[(data[p + 2] << 8) | data[p + 3]] = -1
                    acked[s] = 1
                    got += 1
                p += 4
                continue
            decoded = decode_remaining_length(data, p)  # anything else (PINGRESP) is skipped
            if decoded is None or p + decoded[0] + decoded[1] > end:
                break
            p += decoded[0] + decoded[1]
        data = data[p:]
        if got:
            inflight -= got
            nacked += got
            t_end = perf_ns()
            last_progress = monotonic()

    if qos == 0:
        # The broker reads a connection in order: its PINGRESP means it has read every PUBLISH before.
        _send_all(conn, PINGREQ_PACKET, stall)
        try:
            while True:
                first, _ = conn.read_packet(monotonic() + stall, "PINGRESP")
                if first == 0xD0:
                    break
            t_end = perf_ns()
        except BrokerError:
            stalled = True
            t_end = perf_ns()
    return {
        "sent": seq,
        "acked": nacked if qos else None,
        "acked_map": bytes(acked) if qos else None,
        "t_first": t_first,
        "t_end": t_end,
        "stalled": stalled,
        "inflight": inflight if qos else 0,
        "cpu": _cpu() - cpu_start,
    }


# -- consumers -----------------------------------------------------------------------------------------------

def consumer_main(index: int, control: Any, settings: Settings, progress: Any, expected: Any, seen: Any) -> None:
    _worker("consumer", index, control, _consumer, settings, progress, expected, seen)


def _consumer(index: int, control: Any, settings: Settings, progress: Any, expected: Any, seen: Any) -> None:
    conn = Connection.open(settings.host, settings.port, f"{settings.client_prefix}-sub-{index}", KEEP_ALIVE,
                           settings.connect_timeout, settings.cafile)
    try:
        conn.subscribe(settings.sub_topic, 1, settings.connect_timeout)
        control.put(("ready", "consumer", index))
        result = _consume(conn, index, settings, progress, expected, seen)
    finally:
        conn.disconnect()
    control.put(("result", "consumer", index, result))


def _consume(conn: Connection, index: int, settings: Settings, progress: Any, expected: Any,
             seen_shared: Any) -> dict[str, Any]:
    """Receive until every expected message was delivered (to any consumer; with ``fan_out``, to this one), or
    nothing new arrived for ``drain_timeout`` seconds after the publishers finished.

    ``progress[i]`` is consumer i's count of first deliveries, ``seen_shared`` a byte per message of the run
    (set by whichever consumer gets it first), ``expected.value`` the messages to wait for (-1 while the
    publishers run)."""
    cpu_start = _cpu()
    sock = conn.sock
    _kernel_timeouts(sock)
    recv = sock.recv
    unpack_from = HEADER.unpack_from
    perf_ns = time.perf_counter_ns
    monotonic = time.monotonic
    run_id = settings.run_id
    drain = settings.drain_timeout
    limits = list(settings.per_publisher)
    npub = len(limits)
    offsets = [sum(limits[:i]) for i in range(npub)]
    # Fan-out: this consumer must see every message itself, so the first deliveries it counts are its own.
    seen = memoryview(bytearray(len(seen_shared)) if settings.fan_out else seen_shared).cast("B")
    fan_out = settings.fan_out

    keys = array("Q")
    lats = array("q")
    keys_append = keys.append
    lats_append = lats.append
    unique = 0
    foreign = 0
    t_last = 0
    ndeliveries = 0
    timed_out = False

    last_total = -1
    last_change = monotonic()
    expected_since = 0.0
    last_send = monotonic()

    data = conn.pending
    have_data = bool(data)
    while True:
        if not have_data:
            try:
                chunk = recv(65536)
            except WOULD_BLOCK:
                chunk = None
            except OSError as exc:
                raise BrokerError(f"connection to {conn.where} lost after {len(keys)} deliveries: "
                                  f"{describe_os_error(exc)}") from None
            else:
                if not chunk:
                    raise BrokerError(f"broker at {conn.where} closed the connection after {len(keys)} "
                                      "deliveries")
                data = data + chunk if data else chunk
        have_data = False

        if data:
            now = perf_ns()
            end = len(data)
            p = 0
            ids = []
            ids_append = ids.append
            while p + 2 <= end:
                first = data[p]
                h = data[p + 1]
                if h < 128:
                    rl = h
                    h = p + 2
                else:
                    decoded = decode_remaining_length(data, p)
                    if decoded is None:
                        break
                    rl, h = decoded
                    h += p
                stop = h + rl
                if stop > end:
                    break
                if first & 0xF0 == 0x30:  # PUBLISH
                    q = h + 2 + ((data[h] << 8) | data[h + 1])
                    if first & 0x06:
                        ids_append(data[q:q + 2])
                        q += 2
                    if stop - q >= 20:
                        run, key, ts = unpack_from(data, q)
                        if run == run_id:
                            keys_append(key)
                            lats_append(now - ts)
                            pub = key >> 32
                            if pub < npub:
                                i = key & 0xFFFFFFFF
                                if i < limits[pub]:
                                    i += offsets[pub]
                                    if not seen[i]:
                                        seen[i] = 1
                                        unique += 1
                            p = stop
                            continue
                    foreign += 1
                p = stop
            data = data[p:]
            if ids:
                _send_all(conn, b"\x40\x02" + b"\x40\x02".join(ids), drain)
                last_send = monotonic()
            if len(keys) != ndeliveries:
                ndeliveries = len(keys)
                t_last = now
                progress[index] = unique

        # Stop conditions.
        total = unique if fan_out else sum(progress)
        now_s = monotonic()
        if total != last_total:
            last_total = total
            last_change = now_s
        want = expected.value
        if want >= 0:
            if total >= want:
                break
            if not expected_since:
                expected_since = now_s
            if now_s - max(last_change, expected_since) >= drain:
                timed_out = True
                break
        if now_s - last_send > KEEP_ALIVE / 2:
            _send_all(conn, PINGREQ_PACKET, drain)
            last_send = now_s

    return {
        "keys": keys,
        "lats": lats,
        "unique": unique,
        "foreign": foreign,
        "t_last": t_last,
        "timed_out": timed_out,
        "cpu": _cpu() - cpu_start,
    }
