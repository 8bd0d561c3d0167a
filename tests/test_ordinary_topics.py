"""Ordinary topics and MQTT 3.1.1 sessions on a real broker, with real clients (paho-mqtt, raw sockets)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.conftest import BrokerFactory
from tests.support import (BrokerProcess, RawMqtt, connect_packet, puback_packet, publish_packet, subscribe_packet,
                           wait_until)


def _send_quietly(client: RawMqtt, packets: list[bytes]) -> None:
    """Send ``packets`` in chunks until the broker goes away."""
    try:
        for i in range(0, len(packets), 50):
            client.send(b"".join(packets[i:i + 50]))
    except OSError:
        pass


def read_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_wildcards_overlapping_subscriptions_and_qos_downgrade(broker: BrokerProcess, mqtt_client) -> None:
    sub = mqtt_client(broker.port, client_id="sub")
    assert [c.value for c in sub.subscribe("home/+/temp", qos=1)] == [1]
    assert [c.value for c in sub.subscribe("home/#", qos=0)] == [0]
    pub = mqtt_client(broker.port, client_id="pub")
    pub.publish("home/kitchen/temp", b"21", qos=2)
    pub.publish("home/kitchen/light", b"on", qos=1)
    pub.publish("office/kitchen/temp", b"nobody", qos=1)
    got = sub.expect(2)
    assert [(m.topic, m.payload, m.qos) for m in got] == [("home/kitchen/temp", b"21", 1),  # once, at the higher
                                                          ("home/kitchen/light", b"on", 0)]
    assert sub.no_message(0.3)


def test_retained_set_replaced_cleared_and_sent_on_subscribe(broker: BrokerProcess, mqtt_client) -> None:
    pub = mqtt_client(broker.port)
    pub.publish("cfg/a", b"1", qos=1, retain=True)
    pub.publish("cfg/a", b"2", qos=1, retain=True)
    pub.publish("cfg/b", b"x", qos=1, retain=True)
    pub.publish("cfg/b", b"", qos=1, retain=True)  # clears
    late = mqtt_client(broker.port)
    late.subscribe("cfg/#", qos=1)
    [retained] = late.expect(1)
    assert (retained.topic, retained.payload, retained.retain) == ("cfg/a", b"2", True)
    pub.publish("cfg/a", b"3", qos=1, retain=True)
    [live] = late.expect(1)
    assert (live.payload, live.retain) == (b"3", False)
    assert late.no_message(0.3)


def test_a_will_is_published_on_an_abrupt_close_and_not_after_disconnect(broker: BrokerProcess, mqtt_client) -> None:
    watcher = mqtt_client(broker.port)
    watcher.subscribe("wills/#", qos=1)
    for name, polite in (("rude", False), ("polite", True)):
        sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
        sock.sendall(connect_packet(name, will=(f"wills/{name}", b"gone", 1)))
        assert sock.recv(4)[0] == 0x20  # CONNACK
        if polite:
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        sock.close()
    [will] = watcher.expect(1)
    assert (will.topic, will.payload) == ("wills/rude", b"gone")
    assert watcher.no_message(0.5)


def test_a_persistent_subscriber_gets_1000_messages_sent_while_it_was_offline_in_order(broker: BrokerProcess,
                                                                                       mqtt_client) -> None:
    sub = mqtt_client(broker.port, client_id="away", clean_session=False)
    sub.subscribe("jobs/#", qos=1)
    sub.disconnect()
    pub = mqtt_client(broker.port)
    for i in range(999):
        pub.client.publish("jobs/x", b"%d" % i, qos=1)
    pub.publish("jobs/x", b"last", qos=1)  # the 1,000th, max_queued_messages (waits for its PUBACK)
    back = mqtt_client(broker.port, client_id="away", clean_session=False)
    got = back.expect(1000, timeout=30)
    assert [m.payload for m in got] == [b"%d" % i for i in range(999)] + [b"last"]
    assert back.no_message(0.3)


def test_messages_in_flight_are_sent_again_with_dup_in_order_on_resume(broker: BrokerProcess, mqtt_client) -> None:
    first = RawMqtt(broker.port, "resume", clean_session=False)
    first.send(subscribe_packet("r/#", qos=1, packet_id=1))
    assert first.read(5).type == 9  # SUBACK
    pub = mqtt_client(broker.port)
    for i in range(3):
        pub.publish("r/x", b"%d" % i, qos=1)
    held = [first.read(5) for _ in range(3)]
    assert [f.publish_fields()[2] for f in held] == [b"0", b"1", b"2"]
    first.send(puback_packet(held[0].publish_fields()[1]))  # only the first is acknowledged
    first.close()
    again = RawMqtt(broker.port, "resume", clean_session=False)
    assert again.session_present
    resent = [again.read(5) for _ in range(2)]
    assert [f.publish_fields()[2] for f in resent] == [b"1", b"2"]
    assert [f.publish_fields()[1] for f in resent] == [f.publish_fields()[1] for f in held[1:]]
    assert all(f.dup for f in resent), "DUP set on a resend [MQTT-4.4.0-1]"


def test_a_subscriber_that_stops_reading_keeps_the_broker_bounded(broker_factory: BrokerFactory,
                                                                   mqtt_client) -> None:
    broker = broker_factory()
    stopped = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    stopped.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stopped.sendall(connect_packet("stopped"))
    assert stopped.recv(4)[0] == 0x20
    stopped.sendall(subscribe_packet("flood/#", qos=1) + subscribe_packet("flood0/#", qos=0, packet_id=2))
    healthy = mqtt_client(broker.port, client_id="healthy")
    healthy.subscribe("flood/#", qos=1)
    pub = mqtt_client(broker.port)
    before = read_rss_kib(broker.pid)
    chunk = b"z" * 8192
    for i in range(1024):  # 8 MiB at QoS 1, then 8 MiB at QoS 0: the stopped reader reads none of it
        pub.client.publish("flood/x", chunk, qos=1)
        pub.client.publish("flood0/x", chunk, qos=0)
    pub.publish("flood/x", b"end", qos=1)
    got = healthy.expect(1025, timeout=60)
    assert got[-1].payload == b"end", "the healthy subscriber got everything"
    grown = read_rss_kib(broker.pid) - before
    assert grown < 48 * 1024, f"the broker grew by {grown} KiB for a reader that stopped"
    stopped.close()


def test_the_queue_limits_are_the_flags(broker_factory: BrokerFactory, mqtt_client) -> None:
    broker = broker_factory(["--max-inflight-messages", "3", "--max-queued-messages", "5"])
    away = mqtt_client(broker.port, client_id="limited", clean_session=False)
    away.subscribe("lim/#", qos=1)
    away.disconnect()
    pub = mqtt_client(broker.port)
    for i in range(20):
        pub.publish("lim/x", b"%d" % i, qos=1)
    back = RawMqtt(broker.port, "limited", clean_session=False)
    first = [back.read(5) for _ in range(3)]
    assert [f.publish_fields()[2] for f in first] == [b"0", b"1", b"2"], "3 in flight"
    with pytest.raises(TimeoutError):  # no more until one is acknowledged
        back.read(0.5)
    for frame in first:
        back.send(puback_packet(frame.publish_fields()[1]))
    rest = [back.read(5) for _ in range(2)]
    assert [f.publish_fields()[2] for f in rest] == [b"3", b"4"], "5 kept in all, the other 15 dropped"
    with pytest.raises(TimeoutError):
        back.read(0.5)


def test_a_persistent_session_away_past_its_expiration_is_forgotten(broker_factory: BrokerFactory,
                                                                     mqtt_client) -> None:
    broker = broker_factory(["--persistent-client-expiration", "1"])
    away = mqtt_client(broker.port, client_id="leaver", clean_session=False)
    away.subscribe("exp/#", qos=1)
    away.disconnect()
    mqtt_client(broker.port).publish("exp/x", b"kept for a second", qos=1)
    wait_until(lambda: "session of client leaver expired" in broker.log, 10, "the session's expiry")
    back = RawMqtt(broker.port, "leaver", clean_session=False)
    assert back.session_present is False
    with pytest.raises(TimeoutError):
        back.read(0.5)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_persistent_session_and_retained_messages_survive_the_broker_stopping(broker: BrokerProcess, mqtt_client,
                                                                                stop: str) -> None:
    sub = mqtt_client(broker.port, client_id="durable", clean_session=False)
    sub.subscribe("jobs/#", qos=1)
    sub.subscribe("$queue/work", qos=1)  # a queue subscription is kept with the session too
    sub.disconnect()
    pub = mqtt_client(broker.port)
    pub.publish("cfg/mode", b"kept", qos=1, retain=True)
    for i in range(999):
        pub.client.publish("jobs/x", b"%d" % i, qos=1)
    pub.publish("jobs/x", b"last", qos=1)  # PUBACKs come in order: every one before it is acknowledged too
    pub.disconnect()
    if stop == "SIGKILL":
        broker.kill()
    else:
        broker.stop()
    broker.start()
    assert "1 persistent session(s) holding 1000 message(s), and 1 retained message(s), recovered" in broker.log
    back = mqtt_client(broker.port, client_id="durable", clean_session=False)
    got = back.expect(1000, timeout=30)
    assert [m.payload for m in got] == [b"%d" % i for i in range(999)] + [b"last"]
    assert back.no_message(0.3)
    mqtt_client(broker.port).publish("$queue/work", b"a job", qos=1)
    [job] = back.expect(1)
    assert (job.topic, job.payload) == ("$queue/work", b"a job")
    late = mqtt_client(broker.port)
    late.subscribe("cfg/#", qos=1)
    [retained] = late.expect(1)
    assert (retained.topic, retained.payload, retained.retain) == ("cfg/mode", b"kept", True)


def test_kill_9_under_load_loses_no_acknowledged_message_of_an_offline_persistent_session(
        broker_factory: BrokerFactory, mqtt_client) -> None:
    """A publisher sends 10,000 QoS 1 messages as fast as it can; the broker is killed once 1,000 PUBACKs are in.
    Every payload PUBACKed before the kill arrives after the restart, once each and in order."""
    broker = broker_factory(["--max-queued-messages", "0"])
    sub = mqtt_client(broker.port, client_id="offline", clean_session=False)
    sub.subscribe("load/#", qos=1)
    sub.disconnect()
    pub = RawMqtt(broker.port, "loader")
    sender = threading.Thread(target=lambda: _send_quietly(
        pub, [publish_packet("load/x", b"%d" % i, qos=1, packet_id=i) for i in range(1, 10001)]), daemon=True)
    sender.start()
    acked = []
    while len(acked) < 1000:
        frame = pub.read(10)
        assert frame.type == 4
        acked.append(int.from_bytes(frame.body[:2], "big"))
    broker.kill()
    try:
        while True:  # PUBACKs the broker wrote before it died count too
            frame = pub.read(10)
            acked.append(int.from_bytes(frame.body[:2], "big"))
    except (EOFError, OSError):
        pass
    sender.join(10)
    assert acked == list(range(1, len(acked) + 1)), "PUBACKs in order"
    broker.start()
    back = RawMqtt(broker.port, "offline", clean_session=False)
    assert back.session_present
    received = []
    try:
        while True:
            frame = back.read(1.0)
            if frame.type == 3:
                _, packet_id, payload = frame.publish_fields()
                received.append(int(payload))
                back.send(puback_packet(packet_id))
    except TimeoutError:
        pass
    assert set(acked) <= set(received), f"lost: {sorted(set(acked) - set(received))[:10]}"
    assert received == sorted(set(received)), "no duplicates, in order"


@pytest.mark.parametrize("topic", ["$queue/once", "plain/once"])
def test_a_qos_2_publish_awaiting_pubrel_is_not_taken_twice_after_a_kill_9(broker: BrokerProcess, mqtt_client,
                                                                          topic: str) -> None:
    sub = mqtt_client(broker.port, client_id="taker", clean_session=False)
    sub.subscribe(topic, qos=1)
    sub.disconnect()
    pub = RawMqtt(broker.port, "exactly-once", clean_session=False)
    pub.send(publish_packet(topic, b"only one", qos=2, packet_id=9))
    assert pub.read(10).type == 5  # PUBREC: stored; no PUBREL yet
    broker.kill()
    broker.start()
    again = RawMqtt(broker.port, "exactly-once", clean_session=False)
    assert again.session_present
    again.send(publish_packet(topic, b"only one", qos=2, packet_id=9, dup=True))  # the retransmission
    assert again.read(10).type == 5
    again.send(b"\x62\x02\x00\x09")  # PUBREL
    assert again.read(10).type == 7  # PUBCOMP
    back = mqtt_client(broker.port, client_id="taker", clean_session=False)
    [got] = back.expect(1, timeout=10)
    assert got.payload == b"only one"
    assert back.no_message(0.5), "stored once"
