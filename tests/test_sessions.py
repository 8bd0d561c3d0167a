"""MQTT 3.1.1 sessions and the fan-out of ordinary topics (``shoalmq.broker.sessions``), with in-memory connections:
what each connection is written is decoded with the broker's own codec."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from shoalmq._native import mqtt_codec
from shoalmq._native.mqtt_packets import PUBLISH, PUBREL
from shoalmq.broker.sessions import SUBACK_FAILURE, Limits, Message, Session, SessionEngine, publish_frame


class FakeConnection:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.backlog = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def buffered(self) -> int:
        return self.backlog

    def close(self) -> None:
        self.closed = True

    def packets(self) -> list[tuple]:
        """Everything written so far, decoded (and forgotten)."""
        data, self.writes = b"".join(self.writes), []
        packets, consumed = mqtt_codec.decode(data, 1 << 30)
        assert consumed == len(data)
        return packets

    def publishes(self) -> list[tuple[str, bytes, int, int, bool, bool]]:
        """(topic, payload, qos, packet id, dup, retain) of the PUBLISHes written so far."""
        return [(p[2], p[4], (p[1] >> 1) & 3, p[3], bool(p[1] & 8), bool(p[1] & 1))
                for p in self.packets() if p[0] == PUBLISH]


def run(body: Callable[[SessionEngine], Any], limits: Limits | None = None) -> None:
    async def main() -> None:
        await body(SessionEngine(limits))
    asyncio.run(main())


async def turn() -> None:
    """Let the engine's once-per-turn flush run."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def msg(topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> Message:
    return Message(topic, payload.encode() if isinstance(payload, str) else payload, qos, retain)


def test_publish_frames_decode_to_what_was_encoded() -> None:
    shared = msg("a/é", b"x" * 300)  # live deliveries reuse what was encoded for it before
    for qos, packet_id, dup, retain in [(0, 0, False, False), (1, 7, True, False), (2, 65535, False, True),
                                        (1, 9, False, False), (2, 10, False, False), (0, 0, False, False),
                                        (1, 11, False, False)]:
        frame = publish_frame(shared, qos, packet_id, dup=dup, retain=retain)
        [(kind, flags, topic, got_id, payload)], consumed = mqtt_codec.decode(frame, 1 << 20)
        assert (kind, topic, got_id, payload, consumed) == (PUBLISH, "a/é", packet_id, b"x" * 300, len(frame))
        assert ((flags >> 1) & 3, bool(flags & 8), bool(flags & 1)) == (qos, dup, retain)


def test_fan_out_downgrades_to_the_subscription_qos_and_writes_once_per_turn() -> None:
    async def body(engine: SessionEngine) -> None:
        a, b = FakeConnection(), FakeConnection()
        sa, _ = engine.connect("a", True, a)
        sb, _ = engine.connect("b", True, b)
        assert engine.subscribe(sa, [("sensors/+", 1), ("sensors/#", 0)]) == [1, 0]
        assert engine.subscribe(sb, [("sensors/t", 2), ("bad/#/x", 1)]) == [2, SUBACK_FAILURE]
        for i in range(50):
            engine.publish(msg("sensors/t", f"{i}", qos=2))
        engine.publish(msg("sensors/t", "last", qos=0))
        await turn()
        assert len(a.writes) == 1 and len(b.writes) == 1  # 51 messages, one write per connection
        got_a, got_b = a.publishes(), b.publishes()
        assert [p[1] for p in got_a] == [b"%d" % i for i in range(50)] + [b"last"]
        assert {p[2] for p in got_a[:50]} == {1}, "QoS 2 published, QoS 1 granted (the higher of a's filters)"
        assert {p[2] for p in got_b[:50]} == {2} and got_b[50][2] == 0
        assert len({p[3] for p in got_b[:50]}) == 50, "distinct packet ids in flight"
    run(body, Limits(max_inflight=100))


def test_dollar_topics_are_not_matched_by_a_wildcard_first_level() -> None:
    async def body(engine: SessionEngine) -> None:
        conn = FakeConnection()
        session, _ = engine.connect("c", True, conn)
        engine.subscribe(session, [("#", 0), ("+/x", 0)])
        assert engine.publish(msg("$SYS/x", "no")) == 0
        engine.subscribe(session, [("$SYS/#", 0)])
        assert engine.publish(msg("$SYS/x", "yes")) == 1
        await turn()
        assert [p[1] for p in conn.publishes()] == [b"yes"]
    run(body)


def test_retained_messages_are_set_replaced_cleared_and_sent_on_subscribe() -> None:
    async def body(engine: SessionEngine) -> None:
        engine.publish(msg("r/1", "one", qos=1, retain=True))
        engine.publish(msg("r/2", "two", qos=0, retain=True))
        engine.publish(msg("r/2", "two again", qos=2, retain=True))  # replaces
        engine.publish(msg("r/3", "three", qos=1, retain=True))
        engine.publish(msg("r/3", "", qos=0, retain=True))  # clears [MQTT-3.3.1-10]
        conn = FakeConnection()
        session, _ = engine.connect("late", True, conn)
        engine.subscribe(session, [("r/+", 1)])
        engine.publish(msg("r/1", "live", qos=1, retain=True))
        await turn()
        got = conn.publishes()
        assert sorted((t, p, q, r) for t, p, q, _, _, r in got[:2]) == [("r/1", b"one", 1, True),
                                                                         ("r/2", b"two again", 1, True)]
        assert [(t, p, r) for t, p, _, _, _, r in got[2:]] == [("r/1", b"live", False)], "live: RETAIN clear"
        assert set(engine.retained) == {"r/1", "r/2"}
    run(body)


def test_a_persistent_session_keeps_what_arrives_offline_and_sends_it_in_order_within_its_window() -> None:
    async def body(engine: SessionEngine) -> None:
        first = FakeConnection()
        session, present = engine.connect("p", False, first)
        assert not present
        engine.subscribe(session, [("jobs/#", 1)])
        engine.end(session, first)
        for i in range(1000):
            engine.publish(msg("jobs/x", f"{i}", qos=1))
        engine.publish(msg("jobs/x", "qos0 while offline", qos=0))  # not kept: at most once
        assert len(session.queued) == 1000
        again = FakeConnection()
        resumed, present = engine.connect("p", False, again)
        assert resumed is session and present
        received = []
        while len(received) < 1000:
            await turn()
            batch = again.publishes()
            assert 0 < len(batch) <= 20, "at most max_inflight in flight"
            received += batch
            for _, _, _, packet_id, _, _ in batch:
                assert engine.puback(session, packet_id)
        assert [p[1] for p in received] == [b"%d" % i for i in range(1000)]
        assert not session.inflight and not session.queued and session.queued_bytes == 0
    run(body)


def test_messages_in_flight_go_again_with_dup_in_order_before_the_queue_on_resume() -> None:
    async def body(engine: SessionEngine) -> None:
        first = FakeConnection()
        session, _ = engine.connect("r", False, first)
        engine.subscribe(session, [("t", 2)])
        engine.publish(msg("t", "q1", qos=1))
        engine.publish(msg("t", "q2", qos=2))
        engine.publish(msg("t", "q2b", qos=2))
        await turn()
        sent = first.publishes()
        assert [p[1] for p in sent] == [b"q1", b"q2", b"q2b"]
        assert engine.pubrec(session, sent[2][3])  # q2b: PUBREC in, PUBREL out
        await turn()
        assert [p[0] for p in first.packets()] == [PUBREL]
        engine.end(session, first)  # gone before any other ack
        engine.publish(msg("t", "later", qos=1))
        again = FakeConnection()
        engine.connect("r", False, again)
        await turn()
        packets = again.packets()
        assert [(p[0], p[2] if p[0] == PUBLISH else None, bool(p[1] & 8)) for p in packets] == [
            (PUBLISH, "t", True), (PUBLISH, "t", True), (PUBREL, None, False), (PUBLISH, "t", False)]
        assert [p[4] for p in packets if p[0] == PUBLISH] == [b"q1", b"q2", b"later"]
        assert packets[0][3] == sent[0][3] and packets[1][3] == sent[1][3], "the same packet ids [MQTT-4.4.0-1]"
        assert engine.pubcomp(session, sent[2][3])
        assert not engine.pubcomp(session, sent[1][3]), "q2 has had no PUBREC yet"
    run(body)


def test_a_full_queue_drops_counts_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    async def body(engine: SessionEngine) -> None:
        conn = FakeConnection()
        session, _ = engine.connect("slow", False, conn)
        engine.subscribe(session, [("t", 1)])
        with caplog.at_level(logging.WARNING, logger="shoalmq.broker.sessions"):
            for i in range(2 + 5 + 10):
                engine.publish(msg("t", f"{i}", qos=1))
        assert len(session.inflight) == 2 and len(session.queued) == 5 and session.dropped == 10
        assert len([r for r in caplog.records if "dropping messages because its queue is full" in r.message]) == 1
        conn.backlog = 10 << 20  # a stopped reader: QoS 0 is dropped, not buffered
        engine.publish(msg("t", "qos0", qos=0))
        assert session.dropped == 11
    run(body, Limits(max_inflight=2, max_queued=5))


def test_the_queue_is_bounded_in_bytes_too() -> None:
    async def body(engine: SessionEngine) -> None:
        session, _ = engine.connect("b", False, FakeConnection())
        engine.subscribe(session, [("t", 1)])
        engine.end(session, session.connection)
        for _ in range(10):
            engine.publish(msg("t", b"x" * 400, qos=1))
        assert len(session.queued) == 2 and session.queued_bytes == 800 and session.dropped == 8
    run(body, Limits(max_queued_bytes=1000))


def test_wills_are_published_when_a_connection_ends_without_disconnect() -> None:
    async def body(engine: SessionEngine) -> None:
        watcher = FakeConnection()
        w, _ = engine.connect("watcher", True, watcher)
        engine.subscribe(w, [("status/#", 1)])
        conn = FakeConnection()
        session, _ = engine.connect("dev", True, conn)
        engine.end(session, conn, msg("status/dev", "gone", qos=1, retain=True))
        quiet = FakeConnection()
        other, _ = engine.connect("polite", True, quiet)
        engine.end(other, quiet)  # DISCONNECT: no will
        await turn()
        assert [(t, p) for t, p, *_ in watcher.publishes()] == [("status/dev", b"gone")]
        assert engine.retained["status/dev"].payload == b"gone"
        assert "dev" not in engine.sessions and "polite" not in engine.sessions  # clean sessions end with them
    run(body)


def test_a_newer_connection_takes_the_session_over_and_the_older_ones_end_changes_nothing() -> None:
    async def body(engine: SessionEngine) -> None:
        old = FakeConnection()
        session, _ = engine.connect("x", False, old)
        engine.subscribe(session, [("t", 1)])
        new = FakeConnection()
        same, present = engine.connect("x", False, new)
        assert same is session and present and old.closed
        engine.end(session, old)  # the older connection's end, reported late
        engine.publish(msg("t", "to the new one", qos=1))
        await turn()
        assert [p[1] for p in new.publishes()] == [b"to the new one"] and not old.writes
        clean = FakeConnection()
        fresh, present = engine.connect("x", True, clean)  # clean session: the old one is gone
        assert fresh is not session and not present and new.closed
        assert engine.publish(msg("t", "nobody")) == 0
    run(body)


def test_packet_ids_skip_those_in_use_by_others_on_the_connection() -> None:
    session = Session("ids", False, busy=lambda packet_id: packet_id in (1, 2, 4))
    assert [session.next_packet_id() for _ in range(3)] == [3, 5, 6]


def test_an_inbound_qos2_publish_is_routed_once_until_released() -> None:
    async def body(engine: SessionEngine) -> None:
        session, _ = engine.connect("pub", True, FakeConnection())
        assert engine.receive_qos2(session, 9)
        assert not engine.receive_qos2(session, 9)  # a resend before PUBREL
        engine.release(session, 9)
        assert engine.receive_qos2(session, 9)  # the id is free again
    run(body)


def test_a_queue_limit_of_0_is_no_limit() -> None:
    async def body(engine: SessionEngine) -> None:
        session, _ = engine.connect("u", False, FakeConnection())
        engine.subscribe(session, [("t", 1)])
        engine.end(session, session.connection)
        for i in range(5000):
            engine.publish(msg("t", b"%d" % i, qos=1))
        assert len(session.queued) == 5000 and session.dropped == 0
    run(body, Limits(max_queued=0))


def test_a_persistent_session_expires_after_its_client_stays_away(caplog: pytest.LogCaptureFixture) -> None:
    async def body(engine: SessionEngine) -> None:
        gone, back = FakeConnection(), FakeConnection()
        lost, _ = engine.connect("gone", False, gone)
        kept, _ = engine.connect("back", False, back)
        for session in (lost, kept):
            engine.subscribe(session, [("t", 1)])
        engine.end(lost, gone)
        engine.end(kept, back)
        engine.publish(msg("t", "queued", qos=1))
        again = FakeConnection()
        resumed, present = engine.connect("back", False, again)  # back in time: its expiry is called off
        assert present and resumed is kept
        with caplog.at_level(logging.INFO, logger="shoalmq.broker.sessions"):
            await asyncio.sleep(0.15)
        assert "gone" not in engine.sessions and "back" in engine.sessions
        assert engine.publish(msg("t", "after")) == 1, "the expired session's subscription is gone too"
        assert any("session of client gone expired after 0 s away: 1 queued" in r.message for r in caplog.records)
        fresh, present = engine.connect("gone", False, FakeConnection())
        assert not present and fresh is not lost
    run(body, Limits(expiry=0.1))


def test_a_subscriber_still_acknowledging_holds_its_publishers_back_past_half_its_queue() -> None:
    async def body(engine: SessionEngine) -> None:
        conn = FakeConnection()
        session, _ = engine.connect("slow", True, conn)
        engine.subscribe(session, [("t/#", 1)])
        for i in range(2 + 4):
            engine.publish(msg("t/x", f"{i}", qos=1))
        assert len(session.queued) == 4 and not engine.holding_back("t/x")  # high water: 10 // 2 = 5
        engine.publish(msg("t/x", "5", qos=1))
        assert engine.holding_back("t/x") and not engine.holding_back("other")
        session.last_ack -= 2  # no acknowledgement for longer than stalled_after: it holds nobody
        assert not engine.holding_back("t/x")
        await turn()
        [first, *_] = conn.publishes()
        assert engine.puback(session, first[3])  # acknowledging again (and one more sent from the queue)
        assert not engine.holding_back("t/x"), "4 queued: under the high-water mark again"
        engine.publish(msg("t/x", "6", qos=1))
        assert engine.holding_back("t/x")
        engine.end(session, conn)  # gone: holds nobody
        assert not engine.holding_back("t/x")
    run(body, Limits(max_inflight=2, max_queued=10, stalled_after=1.0))


def test_a_publisher_is_not_held_back_by_its_own_subscription() -> None:
    async def body(engine: SessionEngine) -> None:
        session, _ = engine.connect("self", True, FakeConnection())
        engine.subscribe(session, [("loop", 1)])
        for i in range(10):
            engine.publish(msg("loop", f"{i}", qos=1))
        assert engine.holding_back("loop") and not engine.holding_back("loop", session)
    run(body, Limits(max_inflight=2, max_queued=10))


def test_a_subscriber_still_reading_with_a_full_buffer_holds_its_publishers_back() -> None:
    async def body(engine: SessionEngine) -> None:
        conn = FakeConnection()
        session, _ = engine.connect("reader", True, conn)
        engine.subscribe(session, [("q0", 0)])

        def state(written: int, backlog: int) -> None:  # bytes written to it so far, and still in its buffer
            session.written, conn.backlog = written, backlog
        state(600, 600)
        assert engine.holding_back("q0"), "over half of max_buffered, and it has not stalled yet"
        state(1200, 900)  # the broker fills it faster than it reads, but it reads: still held back
        assert engine.holding_back("q0")
        state(1200, 400)
        assert not engine.holding_back("q0")
        state(1700, 900)
        session.last_drained -= 2  # nothing read for longer than stalled_after: it holds nobody
        assert not engine.holding_back("q0")
        state(1800, 1000)  # nothing drained (100 more written, 100 more waiting): still stalled
        assert not engine.holding_back("q0")
        state(1800, 900)  # reading again
        assert engine.holding_back("q0")
    run(body, Limits(max_buffered=1000, stalled_after=1.0))


# -- durability (a SessionStore over the in-memory backend: what a restart reads back) ---------------------------

def durable_run(body: Callable[[Callable[[], SessionEngine]], Any], limits: Limits | None = None) -> None:
    """``body(restart)``: each call of ``restart()`` flushes the store so far and returns a new engine recovered
    from the same backend, as a broker started again on the same data directory."""
    from shoalmq.broker.session_store import SessionStore
    from shoalmq.queue.storage import MemoryBackend, Store

    async def main() -> None:
        backend = MemoryBackend()
        stores: list[Store] = []

        async def restart() -> SessionEngine:
            if stores:
                await stores[-1].flush()
            store = Store(backend)
            stores.append(store)
            engine = SessionEngine(limits, SessionStore(store))
            engine.recover()
            return engine
        await body(restart)
        await stores[-1].flush()
    asyncio.run(main())


def test_a_persistent_session_its_messages_and_the_retained_ones_are_read_back_after_a_restart() -> None:
    async def body(restart) -> None:
        engine = await restart()
        conn = FakeConnection()
        session, _ = engine.connect("keeper", False, conn)
        engine.subscribe(session, [("jobs/#", 2), ("alerts", 1)])
        engine.set_queue_subscription(session, "orders", 1)
        engine.receive_qos2(session, 77)  # an inbound QoS 2 publish awaiting PUBREL
        engine.publish(msg("cfg/a", "retained", qos=1, retain=True))
        engine.publish(msg("cfg/b", "cleared", qos=0, retain=True))
        engine.publish(msg("cfg/b", "", qos=0, retain=True))
        for i in range(5):
            engine.publish(msg("jobs/x", f"{i}", qos=1 if i != 2 else 2))
        await turn()
        sent = conn.publishes()  # 0..2 in flight (max_inflight 3), 3 and 4 queued
        assert [p[1] for p in sent] == [b"0", b"1", b"2"]
        engine.puback(session, sent[0][3])  # 3 goes out
        engine.pubrec(session, sent[2][3])  # the QoS 2 one is released
        await turn()
        assert [p[1] for p in conn.publishes()] == [b"3"]
        engine.end(session, conn)
        engine.publish(msg("jobs/y", "while away", qos=1))
        engine.publish(msg("jobs/y", "at most once", qos=0))  # not kept for an absent session

        engine = await restart()
        assert set(engine.retained) == {"cfg/a"} and engine.retained["cfg/a"].payload == b"retained"
        kept = engine.sessions["keeper"]
        assert kept.subscriptions == {"jobs/#": 2, "alerts": 1} and kept.queues == {"orders": 1}
        assert kept.inbound_qos2 == {77}
        assert not engine.receive_qos2(kept, 77), "a resend of the unreleased QoS 2 publish is not routed again"
        again = FakeConnection()
        resumed, present = engine.connect("keeper", False, again)
        assert present and resumed is kept
        await turn()
        packets = again.packets()
        # In flight again, in order: 1 with DUP, the released QoS 2 one as its PUBREL, 3 with DUP; then the queue.
        assert [(p[0], p[4] if p[0] == PUBLISH else None) for p in packets] == [
            (PUBLISH, b"1"), (PUBREL, None), (PUBLISH, b"3")]
        assert all(p[1] & 8 for p in packets if p[0] == PUBLISH)
        assert packets[1][2] == sent[2][3], "the PUBREL keeps its packet id"
        assert engine.puback(resumed, packets[0][3]) and engine.pubcomp(resumed, packets[1][2])
        await turn()
        assert [p[1] for p in again.publishes()] == [b"4", b"while away"]
        # The subscription tree was rebuilt: a live publish reaches it.
        for packet_id in list(resumed.inflight):
            assert engine.puback(resumed, packet_id)
        engine.publish(msg("alerts", "live", qos=1))
        await turn()
        assert [p[1] for p in again.publishes()] == [b"live"]
    durable_run(body, Limits(max_inflight=3))


def test_what_is_acknowledged_or_forgotten_is_gone_after_a_restart() -> None:
    async def body(restart) -> None:
        engine = await restart()
        conn = FakeConnection()
        session, _ = engine.connect("gone", False, conn)
        engine.subscribe(session, [("t", 1)])
        for i in range(3):
            engine.publish(msg("t", f"{i}", qos=1))
        await turn()
        for p in conn.publishes():
            engine.puback(session, p[3])
        other, _ = engine.connect("clean-later", False, FakeConnection())
        engine.subscribe(other, [("u", 1)])
        engine.publish(msg("u", "for the second", qos=1))
        engine.connect("clean-later", True, FakeConnection())  # clean session: the stored one is forgotten

        engine = await restart()
        assert set(engine.sessions) == {"gone"}
        assert not engine.sessions["gone"].inflight and not engine.sessions["gone"].queued
        assert engine.durable.store.backend.dbs["session_messages"] == {}
    durable_run(body)


def test_an_expiry_counts_the_time_away_before_a_restart() -> None:
    async def body(restart) -> None:
        engine = await restart()
        for name in ("left-long-ago", "left-just-now"):
            session, _ = engine.connect(name, False, FakeConnection())
            engine.subscribe(session, [("t", 1)])
            engine.end(session, session.connection)
        engine.sessions["left-long-ago"].left_at -= 3600
        engine._store_session(engine.sessions["left-long-ago"])
        engine = await restart()
        assert set(engine.sessions) == {"left-just-now"}
    durable_run(body, Limits(expiry=600))


def test_a_publish_to_a_persistent_session_waits_for_the_commit_that_stores_it() -> None:
    async def body(restart) -> None:
        engine = await restart()
        session, _ = engine.connect("p", False, FakeConnection())
        engine.subscribe(session, [("t", 1)])
        engine.end(session, session.connection)
        assert engine.take_flush() is not None
        assert engine.take_flush() is None, "nothing written since"
        engine.publish(msg("t", "kept", qos=1))
        flush = engine.take_flush()
        assert flush is not None and not flush.done()
        await flush
        engine.publish(msg("nobody/listens", "x", qos=1))
        assert engine.take_flush() is None
    durable_run(body)


@pytest.mark.parametrize("seed", range(4))
def test_the_retained_index_finds_what_the_spec_says_a_filter_matches(seed: int) -> None:
    from shoalmq._native.topic_tree import check_filter
    from shoalmq.broker.sessions import RetainedMessages
    from tests.test_topic_tree import brute_force_matches, random_filter, random_topic

    rng = random.Random(seed)
    index, held = RetainedMessages(), set()
    for step in range(800):
        topic = random_topic(rng)
        if rng.random() < 0.6:
            index.set(msg(topic, "x", retain=True))
            held.add(topic)
        else:
            assert index.clear_topic(topic) == (topic in held)
            held.discard(topic)
        assert set(index) == held
        topic_filter = random_filter(rng)
        found = [m.topic for m in index.matching(check_filter(topic_filter))]
        assert sorted(found) == sorted(t for t in held if brute_force_matches(topic_filter, t)), (step, topic_filter)
    for topic in list(held):
        index.clear_topic(topic)
    assert not index._root.children, "cleared levels are pruned"
