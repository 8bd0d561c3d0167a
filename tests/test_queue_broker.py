"""``$queue/`` topics through a real broker process, with real clients (paho-mqtt, mosquitto, raw sockets)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shoalmq.broker.fastpath import QueueFastProtocol

from tests.conftest import BrokerFactory
from tests.support import (
    BrokerProcess,
    Frame,
    MosquittoSub,
    RawMqtt,
    mosquitto_pub,
    publish_packet,
    puback_packet,
    wait_until,
)


def test_publish_on_one_client_consume_on_another(broker: BrokerProcess, mqtt_client) -> None:
    consumer = mqtt_client(broker.port, client_id="consumer")
    assert [rc.value for rc in consumer.subscribe("$queue/orders", qos=1)] == [1]
    producer = mqtt_client(broker.port, client_id="producer")
    producer.publish("$queue/orders", b"order-1", qos=1)
    producer.publish("$queue/orders/eu/42", b"order-2", qos=1)
    got = consumer.expect(2)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == [
        ("$queue/orders", b"order-1", 1), ("$queue/orders/eu/42", b"order-2", 1)]


def test_mosquitto_clients_publish_and_consume(broker: BrokerProcess) -> None:
    with MosquittoSub(broker.port, "$queue/jobs/#", 1).wait_subscribed() as sub:
        for i in range(3):
            result = mosquitto_pub(broker.port, "$queue/jobs", f"job-{i}", 1)
            assert result.returncode == 0, result.stderr
        assert sorted(sub.lines(3)) == ["$queue/jobs job-0", "$queue/jobs job-1", "$queue/jobs job-2"]


def test_messages_wait_durably_for_a_consumer_across_a_restart(broker: BrokerProcess, mqtt_client) -> None:
    producer = mqtt_client(broker.port)
    for i in range(20):
        producer.publish("$queue/later", b"%d" % i, qos=1)
    producer.disconnect()
    assert broker.stop() == 0
    broker.start()
    consumer = mqtt_client(broker.port)
    consumer.subscribe("$queue/later")
    assert sorted(int(m.payload) for m in consumer.expect(20)) == list(range(20))


@pytest.mark.timeout(120)
def test_three_consumers_share_messages_exactly_once(broker: BrokerProcess, mqtt_client) -> None:
    consumers = [mqtt_client(broker.port, client_id=f"c{i}") for i in range(3)]
    for c in consumers:
        c.subscribe("$queue/work")
    producer = mqtt_client(broker.port, client_id="p")
    for i in range(3000):
        producer.client.publish("$queue/work", b"%d" % i, qos=1)
    wait_until(lambda: sum(c.messages.qsize() for c in consumers) >= 3000, 60, "3000 deliveries")
    per_consumer = [[m.payload for m in c.expect(c.messages.qsize())] for c in consumers]
    assert all(c.no_message(0.3) for c in consumers), "nothing beyond the 3000"
    counts = Counter(p for got in per_consumer for p in got)
    assert len(counts) == 3000 and set(counts.values()) == {1}
    assert all(per_consumer), [len(got) for got in per_consumer]


def test_a_killed_consumer_s_messages_reach_another_with_dup(broker: BrokerProcess, mqtt_client) -> None:
    doomed = RawMqtt(broker.port, "doomed")
    assert doomed.subscribe("$queue/tasks") == 1
    producer = mqtt_client(broker.port)
    for i in range(5):
        producer.publish("$queue/tasks", b"t%d" % i, qos=1)
    got = doomed.publishes(5)
    assert all(f.qos == 1 and not f.dup for f in got)
    doomed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    doomed.close()  # RST, no DISCONNECT, nothing acked

    survivor = RawMqtt(broker.port, "survivor")
    survivor.subscribe("$queue/tasks")
    again = survivor.publishes(5)
    assert sorted(f.publish_fields()[2] for f in again) == [b"t%d" % i for i in range(5)]
    assert all(f.dup for f in again)
    for f in again:
        survivor.send(puback_packet(f.publish_fields()[1]))
    survivor.close()


def test_an_acked_message_is_gone_and_an_unacked_one_comes_back(broker: BrokerProcess) -> None:
    first = RawMqtt(broker.port, "first")
    first.subscribe("$queue/acks")
    first.send(publish_packet("$queue/acks", b"a", qos=1, packet_id=7))
    first.send(publish_packet("$queue/acks", b"b", qos=1, packet_id=8))
    frames = []
    while len([f for f in frames if f.type == 3]) < 2:
        frames.append(first.read())
    deliveries = {f.publish_fields()[2]: f.publish_fields()[1] for f in frames if f.type == 3}
    assert {f.body for f in frames if f.type == 4} <= {b"\x00\x07", b"\x00\x08"}
    first.send(puback_packet(deliveries[b"a"]))
    first.send(b"\xe0\x00")  # DISCONNECT, leaving b unacked
    first.close()
    second = RawMqtt(broker.port, "second")
    second.subscribe("$queue/acks")
    [frame] = second.publishes(1)
    assert frame.publish_fields()[2] == b"b" and frame.dup
    with pytest.raises(TimeoutError):
        second.publishes(1, timeout=0.5)


def test_a_subscriber_to_everything_never_sees_queue_traffic(broker: BrokerProcess, mqtt_client) -> None:
    everything = mqtt_client(broker.port)
    everything.subscribe("#", qos=1)
    consumer = mqtt_client(broker.port)
    consumer.subscribe("$queue/private")
    producer = mqtt_client(broker.port)
    producer.publish("$queue/private", b"secret", qos=1)
    producer.publish("plain/topic", b"public", qos=1)
    assert consumer.expect(1)[0].payload == b"secret"
    assert [m.topic for m in everything.expect(1)] == ["plain/topic"]
    assert everything.no_message(0.3)


def test_keyed_messages_keep_their_order(broker: BrokerProcess, mqtt_client) -> None:
    producer = mqtt_client(broker.port)
    for i in range(300):
        producer.client.publish(f"$queue/keyed/k{i % 3}", b"%d" % i, qos=1)
    consumer = mqtt_client(broker.port)
    consumer.subscribe("$queue/keyed/#")
    by_key: dict[str, list[int]] = {}
    for m in consumer.expect(300, timeout=30):
        by_key.setdefault(m.topic, []).append(int(m.payload))
    assert sorted(by_key) == ["$queue/keyed/k0", "$queue/keyed/k1", "$queue/keyed/k2"]
    assert all(v == sorted(v) and len(v) == 100 for v in by_key.values())


def test_qos2_publish_is_stored_exactly_once(broker: BrokerProcess) -> None:
    client = RawMqtt(broker.port, "q2")
    client.send(publish_packet("$queue/exact", b"once", qos=2, packet_id=3))
    assert client.read() == Frame(5, 0, b"\x00\x03")  # PUBREC, after the message is durable
    client.send(publish_packet("$queue/exact", b"once", qos=2, packet_id=3, dup=True))  # a retransmission
    assert client.read() == Frame(5, 0, b"\x00\x03")
    client.send(b"\x62\x02\x00\x03")  # PUBREL
    assert client.read() == Frame(7, 0, b"\x00\x03")  # PUBCOMP
    consumer = RawMqtt(broker.port, "reader")
    consumer.subscribe("$queue/exact")
    assert [f.publish_fields()[2] for f in consumer.publishes(1)] == [b"once"]
    with pytest.raises(TimeoutError):
        consumer.publishes(1, timeout=0.5)


def test_consumer_window_limits_unacknowledged_deliveries(broker_factory: BrokerFactory, mqtt_client) -> None:
    broker = broker_factory(["--consumer-window", "4"])
    consumer = RawMqtt(broker.port, "slow")
    consumer.subscribe("$queue/win")
    producer = mqtt_client(broker.port)
    for i in range(10):
        producer.publish("$queue/win", b"%d" % i, qos=1)
    first = consumer.publishes(4)
    with pytest.raises(TimeoutError):
        consumer.publishes(1, timeout=0.5)
    consumer.send(puback_packet(first[0].publish_fields()[1]))
    assert len(consumer.publishes(1)) == 1


def test_max_deliveries_moves_a_message_to_the_dead_letter_queue(tmp_path: Path, broker_factory: BrokerFactory,
                                                                 mqtt_client) -> None:
    config = tmp_path / "shoal.yaml"
    config.write_text("queues:\n  fragile: {partitions: 1, max_deliveries: 2}\n")
    broker = broker_factory(["--config", str(config)])
    mqtt_client(broker.port).publish("$queue/fragile/k", b"poison", qos=1)
    for attempt in range(2):
        consumer = RawMqtt(broker.port, f"attempt{attempt}")
        consumer.subscribe("$queue/fragile")
        assert consumer.publishes(1)[0].publish_fields()[2] == b"poison"
        consumer.close()  # never acked
    dead = mqtt_client(broker.port)
    dead.subscribe("$queue/fragile.dlq")
    [message] = dead.expect(1)
    assert (message.topic, message.payload) == ("$queue/fragile.dlq/k", b"poison")
    late = RawMqtt(broker.port, "late")
    late.subscribe("$queue/fragile")
    with pytest.raises(TimeoutError):
        late.publishes(1, timeout=0.5)


def test_keep_alive_silent_consumer_is_dropped_and_its_messages_requeued(broker: BrokerProcess,
                                                                         mqtt_client) -> None:
    silent = RawMqtt(broker.port, "silent", keep_alive=1)
    silent.subscribe("$queue/ka")
    mqtt_client(broker.port).publish("$queue/ka", b"m", qos=1)
    assert silent.publishes(1)[0].publish_fields()[2] == b"m"
    started = time.monotonic()
    assert silent.closed_by_broker(timeout=5), "a client silent past 1.5 x keep-alive must be dropped"
    assert time.monotonic() - started >= 1.0
    other = mqtt_client(broker.port)
    other.subscribe("$queue/ka")
    [again] = other.expect(1)
    assert again.payload == b"m" and again.dup


@pytest.mark.parametrize("topic, payload, reason", [
    ("$queue/big", b"x" * (256 * 1024 + 1), "exceeds max_payload"),
    ("$queue/bad name", b"x", "bad queue name"),
    ("$queue/", b"x", "bad queue name"),
    ("$SYS/fake", b"x", "reserved"),
])
def test_refused_publishes_close_the_connection_and_are_never_acked(broker: BrokerProcess, mqtt_client,
                                                                    topic: str, payload: bytes,
                                                                    reason: str) -> None:
    bystander = mqtt_client(broker.port)
    bystander.subscribe("$queue/big")
    client = RawMqtt(broker.port, "rude")
    client.send(publish_packet(topic, payload, qos=1, packet_id=9))
    assert client.closed_by_broker(timeout=5)
    wait_until(lambda: reason in broker.log, 5, "the reason in the log")
    assert "Traceback" not in broker.log
    mqtt_client(broker.port).publish("$queue/big", b"small", qos=1)
    assert bystander.expect(1)[0].payload == b"small"


def test_a_client_that_never_sends_connect_is_closed(broker_factory: BrokerFactory, mqtt_client) -> None:
    broker = broker_factory(["--connect-timeout", "1"])
    with socket.create_connection((broker.host, broker.port), timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""
        assert time.monotonic() - started < 5
    mqtt_client(broker.port).publish("still/serving", b"x", qos=1)


def test_a_connection_closed_before_connect_is_one_info_line(broker: BrokerProcess, mqtt_client) -> None:
    socket.create_connection((broker.host, broker.port), timeout=10).close()  # a TCP health check
    wait_until(lambda: "closed before sending CONNECT" in broker.log, 10, "the log line")
    mqtt_client(broker.port).publish("still/serving", b"x", qos=1)
    lines = [line for line in broker.log.splitlines() if "CONNECT" in line or "No data" in line]
    assert len(lines) == 1 and " INFO " in lines[0], lines


@pytest.mark.timeout(120)
def test_sigkill_under_load_loses_no_acknowledged_message(broker: BrokerProcess, mqtt_client) -> None:
    consumer = mqtt_client(broker.port, client_id="during")
    consumer.subscribe("$queue/crash")
    publisher = RawMqtt(broker.port, "publisher")
    acked: set[int] = set()
    inflight: dict[int, int] = {}
    sent = 0
    while len(acked) < 2000:
        while len(inflight) < 50:
            packet_id = sent % 65535 + 1
            publisher.send(publish_packet("$queue/crash", b"%d" % sent, qos=1, packet_id=packet_id))
            inflight[packet_id] = sent
            sent += 1
        frame = publisher.read(10)
        if frame.type == 4:
            acked.add(inflight.pop(int.from_bytes(frame.body[:2], "big")))
    broker.kill()
    try:  # PUBACKs the broker wrote before it died
        while True:
            frame = publisher.read(0.5)
            if frame.type == 4:
                acked.add(inflight.pop(int.from_bytes(frame.body[:2], "big")))
    except (TimeoutError, EOFError, OSError):
        pass
    delivered = [int(m.payload) for m in consumer.expect(consumer.messages.qsize())]

    broker.start()
    after = mqtt_client(broker.port, client_id="after")
    after.subscribe("$queue/crash")
    seen = set(delivered)

    def all_acked_seen() -> bool:
        while after.messages.qsize():
            seen.add(int(after.messages.get().payload))
        return acked <= seen

    wait_until(all_acked_seen, 60, "every PUBACKed message delivered after the restart")
    assert seen <= set(range(sent)), "nothing that was not published"
    assert "Traceback" not in broker.log


def test_unsubscribe_stops_delivery_and_requeues(broker: BrokerProcess, mqtt_client) -> None:
    leaving = RawMqtt(broker.port, "leaving")
    leaving.subscribe("$queue/unsub")
    producer = mqtt_client(broker.port)
    producer.publish("$queue/unsub", b"held", qos=1)
    assert leaving.publishes(1)[0].publish_fields()[2] == b"held"
    topic = b"$queue/unsub"
    leaving.send(b"\xa2" + bytes([2 + 2 + len(topic)]) + b"\x00\x05" + len(topic).to_bytes(2, "big") + topic)
    assert leaving.read() == Frame(11, 0, b"\x00\x05")  # UNSUBACK
    staying = mqtt_client(broker.port)
    staying.subscribe("$queue/unsub")
    [again] = staying.expect(1)
    assert again.payload == b"held" and again.dup
    producer.publish("$queue/unsub", b"new", qos=1)
    assert staying.expect(1)[0].payload == b"new"
    with pytest.raises(TimeoutError):
        leaving.publishes(1, timeout=0.3)


MALFORMED = {
    "remaining length over 4 bytes": b"\x30\xff\xff\xff\xff\x7f",
    "invalid UTF-8 topic": b"\x32\x08\x00\x04\xff\xfe\xfd\xfc\x00\x01",
    "QoS 3": b"\x36\x07\x00\x03a/b\x00\x01",
    "wildcard in a publish topic": b"\x32\x07\x00\x03a/#\x00\x01",
    "empty topic": b"\x32\x04\x00\x00\x00\x01",
    "topic length past the packet": b"\x30\x05\x00\x09abc",
    "SUBSCRIBE with QoS 3": b"\x82\x08\x00\x01\x00\x03a/b\x03",
    "SUBSCRIBE with bad flags": b"\x80\x08\x00\x01\x00\x03a/b\x01",
    "a second CONNECT": None,
    "oversize packet": b"\x30\xff\xff\x7f" + b"\x00\x01a",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_packets_close_only_that_connection(broker_factory: BrokerFactory, mqtt_client,
                                                      case: str) -> None:
    from tests.support import connect_packet

    broker = broker_factory(["--max-packet-size", "65536"])
    bystander = mqtt_client(broker.port)
    bystander.subscribe("$queue/ok")
    bad = RawMqtt(broker.port, "bad")
    bad.send(MALFORMED[case] if MALFORMED[case] is not None else connect_packet("bad"))
    assert bad.closed_by_broker(timeout=5), case
    mqtt_client(broker.port).publish("$queue/ok", b"fine", qos=1)
    assert bystander.expect(1)[0].payload == b"fine"
    assert "Traceback" not in broker.log


def test_the_first_packet_must_be_connect(broker: BrokerProcess, mqtt_client) -> None:
    with socket.create_connection((broker.host, broker.port), timeout=5) as raw:
        raw.sendall(publish_packet("a/b", b"x", qos=0))
        assert raw.recv(10) == b""
    mqtt_client(broker.port).publish("a/b", b"x", qos=1)


def test_a_persistent_session_consumer_resumes_without_resubscribing(broker: BrokerProcess, mqtt_client) -> None:
    worker = mqtt_client(broker.port, client_id="worker", clean_session=False)
    worker.subscribe("$queue/persist")
    worker.disconnect()
    producer = mqtt_client(broker.port)
    for i in range(3):
        producer.publish("$queue/persist", b"%d" % i, qos=1)
    back = mqtt_client(broker.port, client_id="worker", clean_session=False)  # no SUBSCRIBE
    assert sorted(m.payload for m in back.expect(3)) == [b"0", b"1", b"2"]
    back.disconnect()

    fresh = mqtt_client(broker.port, client_id="worker", clean_session=True)  # clean session: subscriptions gone
    producer.publish("$queue/persist", b"later", qos=1)
    assert fresh.no_message(0.5)


def test_max_depth_and_ttl_through_mqtt(tmp_path: Path, broker_factory: BrokerFactory, mqtt_client) -> None:
    config = tmp_path / "shoal.yaml"
    config.write_text("queues:\n  small: {partitions: 1, max_depth: 2}\n  brief: {partitions: 1, ttl: 0.5}\n")
    broker = broker_factory(["--config", str(config)])

    producer = RawMqtt(broker.port, "filler")
    for packet_id in (1, 2):
        producer.send(publish_packet("$queue/small", b"fits", qos=1, packet_id=packet_id))
        assert producer.read() == Frame(4, 0, packet_id.to_bytes(2, "big"))
    producer.send(publish_packet("$queue/small", b"too many", qos=1, packet_id=3))
    assert producer.closed_by_broker(timeout=5), "a publish beyond max_depth is refused, never acked"
    wait_until(lambda: "is full" in broker.log, 5, "the reason in the log")

    mqtt_client(broker.port).publish("$queue/brief", b"stale", qos=1)
    idle = mqtt_client(broker.port)
    assert idle.no_message(1.0)  # a deliberate wait past the TTL
    consumer = mqtt_client(broker.port)
    consumer.subscribe("$queue/brief")
    mqtt_client(broker.port).publish("$queue/brief", b"fresh", qos=1)
    assert [m.payload for m in consumer.expect(1)] == [b"fresh"]
    assert consumer.no_message(0.3)


def test_qos0_subscription_is_at_most_once(broker: BrokerProcess, mqtt_client) -> None:
    casual = RawMqtt(broker.port, "casual")
    assert casual.subscribe("$queue/casual", qos=0) == 0
    mqtt_client(broker.port).publish("$queue/casual", b"once", qos=1)
    [frame] = casual.publishes(1)
    assert frame.qos == 0 and frame.publish_fields()[2] == b"once"
    casual.close()  # no ack was owed: the message is gone
    other = mqtt_client(broker.port)
    other.subscribe("$queue/casual")
    assert other.no_message(0.5)


def test_ack_timeout_redelivers_to_another_consumer(tmp_path: Path, broker_factory: BrokerFactory,
                                                   mqtt_client) -> None:
    config = tmp_path / "shoal.yaml"
    config.write_text("queues:\n  patient: {ack_timeout: 0.5}\n")
    broker = broker_factory(["--config", str(config)])
    sleepy = RawMqtt(broker.port, "sleepy")
    sleepy.subscribe("$queue/patient")
    mqtt_client(broker.port).publish("$queue/patient", b"job", qos=1)
    _, packet_id, payload = sleepy.publishes(1)[0].publish_fields()
    assert payload == b"job" and packet_id is not None
    awake = mqtt_client(broker.port)
    awake.subscribe("$queue/patient")
    [again] = awake.expect(1, timeout=10)  # after the ack timeout, never before it
    assert again.payload == b"job" and again.dup
    # The late PUBACK of the delivery taken back counts for nothing, and is dropped quietly (amqtt used to warn
    # "PUBACK for unknown pending message" once per such ack: hundreds per handoff under load).
    sleepy.send(puback_packet(packet_id) + b"\xc0\x00")  # and a PINGREQ: its PINGRESP says both were read
    assert sleepy.read(timeout=10).type == 13
    assert "unknown pending message" not in broker.log


def test_frames_pipelined_behind_connect_are_served_in_order(broker: BrokerProcess) -> None:
    from tests.support import connect_packet, subscribe_packet

    with socket.create_connection((broker.host, broker.port), timeout=10) as raw:
        # CONNECT, SUBSCRIBE and three queue publishes in one write, before any CONNACK.
        raw.sendall(connect_packet("eager") + subscribe_packet("$queue/eager", 1, 1)
                    + b"".join(publish_packet("$queue/eager", b"%d" % i, qos=1, packet_id=10 + i) for i in range(3)))
        client = RawMqtt.__new__(RawMqtt)
        client.sock, client._buffer, client._early = raw, b"", []
        frames = [client.read() for _ in range(2 + 3 + 3)]  # CONNACK, SUBACK, 3 PUBACKs, 3 deliveries
        assert frames[0].type == 2
        pubacks = [f.body for f in frames if f.type == 4]
        assert pubacks == [b"\x00\x0a", b"\x00\x0b", b"\x00\x0c"], "acknowledged, in order"
        assert sorted(f.publish_fields()[2] for f in frames if f.type == 3) == [b"0", b"1", b"2"]


def test_a_partial_frame_is_not_activity_and_silence_mid_frame_closes_at_1_5x_keep_alive(
        broker: BrokerProcess) -> None:
    """A client whose last whole packet came at t0 and that then sends part of a frame and goes silent is closed
    1.5 x its keep-alive after t0: the partial frame does not count as a control packet [MQTT-3.1.2-24]."""
    client = RawMqtt(broker.port, "partial", keep_alive=2)
    with pytest.raises(TimeoutError):  # 1 s between CONNECT and the last whole packet: the broker's timer, set
        client.read(1.0)               # at CONNECT, must not wait a whole period more after it
    client.send(b"\xc0\x00")  # PINGREQ: the last whole packet
    assert client.read(5).type == 13
    last_whole = time.monotonic()
    with pytest.raises(TimeoutError):  # silent for 2.5 s of the 3 s allowed (and the broker says nothing)
        client.read(2.5)
    client.send(b"\x30\x7f\x00\x05$queu")  # a PUBLISH announcing 127 bytes, 7 of them sent
    assert client.closed_by_broker(timeout=6)
    closed_after = time.monotonic() - last_whole
    assert 2.9 <= closed_after < 4.5, f"closed {closed_after:.1f} s after the last whole packet, not at ~3 s"


@pytest.mark.parametrize("first", [0xF0, 0x00, 0x20, 0x90, 0x60, 0x36, 0x38, 0x10, ord("G")],
                         ids=["reserved-15", "reserved-0", "connack", "suback", "pubrel-flags", "publish-qos3",
                              "publish-qos0-dup", "second-connect", "http"])
def test_a_byte_that_cannot_start_a_packet_closes_the_connection_when_it_arrives(broker: BrokerProcess,
                                                                                 first: int) -> None:
    client = RawMqtt(broker.port, f"bad-{first}", keep_alive=10)
    started = time.monotonic()
    client.send(bytes([first]))
    assert client.closed_by_broker(timeout=5), "keep-alive would take 15 s"
    assert time.monotonic() - started < 2


def test_bytes_that_cannot_start_a_connect_close_the_connection_when_they_arrive(broker: BrokerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    try:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\n")
        assert sock.recv(10) == b"", "closed without an answer"
        assert time.monotonic() - started < 2, "the connect timeout (10 s) is not what closed it"
    finally:
        sock.close()


def test_a_busy_fast_path_client_is_not_taken_for_a_silent_one(broker: BrokerProcess) -> None:
    busy = RawMqtt(broker.port, "busy", keep_alive=1)
    deadline = time.monotonic() + 3.5  # more than 1.5 x its keep-alive, with no PINGREQ
    packet_id = 0
    while time.monotonic() < deadline:
        packet_id = packet_id % 65535 + 1
        busy.send(publish_packet("$queue/busy", b"x", qos=1, packet_id=packet_id))
        assert busy.read(5).type == 4  # PUBACK: still connected


def test_queues_and_ordinary_topics_on_one_connection(broker: BrokerProcess, mqtt_client) -> None:
    both = mqtt_client(broker.port, client_id="both")
    both.subscribe("$queue/mixed")
    both.subscribe("news/#", qos=1)
    both.publish("news/today", b"headline", qos=1, retain=True)
    both.publish("$queue/mixed", b"job", qos=1)
    both.publish("news/today", b"update", qos=0)
    got = sorted((m.topic, m.payload) for m in both.expect(3))
    assert got == [("$queue/mixed", b"job"), ("news/today", b"headline"), ("news/today", b"update")]
    late = mqtt_client(broker.port)
    late.subscribe("news/#", qos=1)
    [retained] = late.expect(1)
    assert (retained.payload, retained.retain) == (b"headline", True)


@pytest.mark.parametrize("clean_session", [False, True])
def test_a_newer_connection_of_a_client_takes_over(broker: BrokerProcess, mqtt_client, clean_session: bool) -> None:
    first = RawMqtt(broker.port, "twice", clean_session=clean_session)
    assert first.subscribe("$queue/takeover") == 1
    second = RawMqtt(broker.port, "twice", clean_session=clean_session)
    assert first.closed_by_broker(timeout=5), "the older connection is closed"
    if clean_session:
        assert second.subscribe("$queue/takeover") == 1
    producer = mqtt_client(broker.port)
    producer.publish("$queue/takeover", b"for the newer one", qos=1)
    assert second.publishes(1)[0].publish_fields()[2] == b"for the newer one"
    # Still connected well after amqtt's session monitor would have dropped it (~1 s).
    assert not second.closed_by_broker(timeout=2)
    producer.publish("$queue/takeover", b"again", qos=1)
    assert second.publishes(1)[0].publish_fields()[2] == b"again"


def test_qos2_state_survives_a_reconnect_of_a_persistent_session(broker: BrokerProcess) -> None:
    first = RawMqtt(broker.port, "q2p", clean_session=False)
    first.send(publish_packet("$queue/q2p", b"once", qos=2, packet_id=5))
    assert first.read() == Frame(5, 0, b"\x00\x05")  # PUBREC
    first.close()  # gone before PUBREL
    again = RawMqtt(broker.port, "q2p", clean_session=False)
    again.send(publish_packet("$queue/q2p", b"once", qos=2, packet_id=5, dup=True))
    assert again.read() == Frame(5, 0, b"\x00\x05")
    again.send(b"\x62\x02\x00\x05")  # PUBREL
    assert again.read() == Frame(7, 0, b"\x00\x05")  # PUBCOMP
    reader = RawMqtt(broker.port, "q2reader")
    reader.subscribe("$queue/q2p")
    assert [f.publish_fields()[2] for f in reader.publishes(1)] == [b"once"]
    with pytest.raises(TimeoutError):
        reader.publishes(1, timeout=0.5)


def test_acks_of_queue_and_ordinary_deliveries_in_one_write(broker: BrokerProcess, mqtt_client) -> None:
    """The fast path applies a read's PUBACKs as one batch and passes those of amqtt's deliveries on to amqtt."""
    client = RawMqtt(broker.port, "mixed-acks", clean_session=False)
    client.subscribe("$queue/acks", packet_id=1)
    client.subscribe("news/#", qos=1, packet_id=2)
    producer = mqtt_client(broker.port)
    producer.publish("$queue/acks", b"job", qos=1)
    producer.publish("news/today", b"headline", qos=1)
    frames = client.publishes(2)
    assert sorted(f.publish_fields()[0] for f in frames) == ["$queue/acks", "news/today"]
    client.send(b"".join(puback_packet(f.publish_fields()[1]) for f in frames) + b"\xc0\x00")  # + PINGREQ
    assert client.read() == Frame(13, 0, b"")  # PINGRESP
    client.close()
    again = RawMqtt(broker.port, "mixed-acks", clean_session=False)  # the session resumes: nothing is resent
    other = RawMqtt(broker.port, "other")
    other.subscribe("$queue/acks")
    with pytest.raises(TimeoutError):
        again.publishes(1, timeout=0.5)
    with pytest.raises(TimeoutError):
        other.publishes(1, timeout=0.3)


def test_fast_path_batches_a_read_s_acks_and_answers_the_rest_in_order() -> None:
    class Transport(asyncio.Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

        def is_closing(self) -> bool:
            return False

    class Handler:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def queue_acks(self, packet_ids: list[int]) -> list[int]:
            self.calls.append(("queue", list(packet_ids)))
            return [i for i in packet_ids if i >= 100]  # ids from 100 up are of ordinary deliveries

        def ordinary_acks(self, kind: int, packet_ids: list[int]) -> None:
            self.calls.append(("ordinary", kind, list(packet_ids)))

        def write(self, data: bytes) -> None:
            self.calls.append(("write", data))

    async def body() -> None:
        protocol = QueueFastProtocol(lambda reader, writer: None, 1 << 20)
        protocol.connection_made(Transport())
        handler = Handler()
        protocol._frames = 1  # CONNECT went by
        protocol.link(handler)
        protocol.data_received(puback_packet(1) + puback_packet(100) + puback_packet(2) + b"\xc0\x00"
                               + puback_packet(3) + puback_packet(101))
        assert handler.calls == [("queue", [1, 100, 2]), ("ordinary", 4, [100]), ("write", b"\xd0\x00"),
                                 ("queue", [3, 101]), ("ordinary", 4, [101])]
        assert bytes(protocol._stream_reader._buffer) == b"", "nothing of it is amqtt's"

    asyncio.run(body())


def test_queue_packet_ids_share_amqtt_s_counter_and_skip_ids_in_use() -> None:
    from amqtt.errors import AMQTTError

    from shoalmq.broker.queue_broker import QueueSession

    class Held:
        packet_id = 0

    session = QueueSession()
    session.queue_inflight = {}
    session.queue_revoked = {2, 4, 9}  # taken back earlier: a reused id is not revoked any more
    session._packet_id = 65533
    session.inflight_out[65535] = object()  # amqtt's own delivery in flight
    session.queue_inflight[1] = Held()  # a queue delivery in flight
    batch = [Held() for _ in range(3)]
    assert session.queue_packet_ids(batch) == [65534, 2, 3]  # 65535 and 1 are taken; the counter wraps
    assert [d.packet_id for d in batch] == [65534, 2, 3] and session.queue_inflight[2] is batch[1]
    assert session.next_packet_id == 4  # amqtt's next id follows on
    assert session.queue_revoked == {9}
    session.queue_inflight.update({i: Held() for i in range(1, 65536)})
    with pytest.raises(AMQTTError, match="no free packet identifier"):
        session.queue_packet_ids([Held()])


def test_a_publisher_that_outruns_the_disk_stops_being_read() -> None:
    from shoalmq.broker import fastpath

    class Transport(asyncio.Transport):
        paused = 0
        resumed = 0

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None:
            self.paused += 1

        def resume_reading(self) -> None:
            self.resumed += 1

    class Handler:
        def __init__(self) -> None:
            self.flushes: list[asyncio.Future[None]] = []
            self.stored = 0

        def queue_publishes(self, runs: list) -> asyncio.Future[None]:
            self.stored += sum(len(run[3]) for run in runs)
            self.flushes.append(asyncio.get_running_loop().create_future())  # a commit that has not ended
            return self.flushes[-1]

    async def body() -> None:
        protocol = QueueFastProtocol(lambda reader, writer: None, 1 << 20)
        transport = Transport()
        protocol.connection_made(transport)
        handler = Handler()
        protocol._frames = 1
        protocol.link(handler)
        read = b"".join(publish_packet("$queue/q", b"x", qos=1, packet_id=i % 65535 + 1) for i in range(1000))
        while handler.stored < fastpath.MAX_UNACKED:
            assert not transport.paused
            protocol.data_received(read)
        assert transport.paused == 1 and handler.stored == fastpath.MAX_UNACKED + 1000 - fastpath.MAX_UNACKED % 1000
        for flush in handler.flushes[:3]:  # commits end: below half of the limit unacknowledged again
            flush.set_result(None)
        await asyncio.sleep(0)
        assert transport.resumed == 1
        for flush in handler.flushes[3:]:
            flush.set_result(None)
        await asyncio.sleep(0)
        assert protocol._unacked == 0 and transport.resumed == 1

    asyncio.run(body())


def test_pubacks_follow_the_order_of_the_publishes_across_queues_and_ordinary_topics(broker: BrokerProcess) -> None:
    """Queue publishes wait for their commit and ordinary ones to a topic nobody keeps do not: their PUBACKs
    still leave in the order the PUBLISHes came [MQTT-4.6.0-2]."""
    client = RawMqtt(broker.port, "mixed")
    topics = ["$queue/mixed", "plain/nobody", "$queue/mixed", "plain/nobody", "plain/nobody", "$queue/mixed"] * 20
    client.send(b"".join(publish_packet(topic, b"x", qos=1, packet_id=i + 1) for i, topic in enumerate(topics)))
    acks = [client.read(10) for _ in topics]
    assert all(frame.type == 4 for frame in acks)
    assert [int.from_bytes(frame.body[:2], "big") for frame in acks] == list(range(1, len(topics) + 1))
    client.close()


def test_the_session_state_machine_behaves_as_amqtt_s() -> None:
    """``SessionStates`` (which replaces amqtt's ``transitions.Machine`` per session) against amqtt's own, for
    every sequence of up to five triggers: the same states, the same refusals, the same callbacks."""
    import itertools

    from amqtt.session import Session
    from transitions import MachineError

    from shoalmq.broker.queue_broker import AMQTT_INIT_STATES, SessionStates

    def trace(session: Session, triggers: tuple[str, ...]) -> list:
        out = []
        for name in triggers:
            try:
                getattr(session.transitions, name)()
                out.append((name, session.transitions.state, session.transitions.is_connected()))
            except (MachineError, ValueError):
                out.append((name, "refused", session.transitions.state))
            out.append((session.last_connect_time is not None, session.last_disconnect_time is not None))
        return out

    for length in range(1, 6):
        for triggers in itertools.product(("connect", "disconnect"), repeat=length):
            ours = Session()
            assert isinstance(ours.transitions, SessionStates)
            theirs = Session()
            AMQTT_INIT_STATES(theirs)
            assert trace(ours, triggers) == trace(theirs, triggers), triggers
