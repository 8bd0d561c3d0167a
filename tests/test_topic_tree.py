"""The subscription engine of ordinary topics (``shoalmq._native.topic_tree``), compiled and pure-Python twins."""

from __future__ import annotations

import random
from typing import Any

import pytest

from shoalmq import _native as native
from shoalmq._native import topic_tree_py

IMPLEMENTATIONS = [pytest.param(native.topic_tree, id="native"), pytest.param(topic_tree_py, id="pure")]


def brute_force_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7, written out directly."""
    f, t = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    for i, level in enumerate(f):
        if level == "#":
            return True  # the parent level and everything below
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


# MQTT 3.1.1 sections 4.7.1.2, 4.7.1.3 and 4.7.2 (non-normative examples).
SPEC = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis/x", True),
    ("#", "$SYS/broker/uptime", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("a/b", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/b", "A/b", False),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("topic_filter, topic, matches", SPEC)
def test_the_spec_examples(impl: Any, topic_filter: str, topic: str, matches: bool) -> None:
    assert brute_force_matches(topic_filter, topic) == matches  # (the reference agrees with the spec)
    tree = impl.TopicTree()
    tree.subscribe(topic_filter, "s", 1)
    assert tree.match(topic) == ({"s": 1} if matches else {})


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("topic_filter", ["", "sport/tennis#", "sport/tennis/#/ranking", "sport+", "#/a", "a/b+/c"])
def test_invalid_filters_are_refused_with_the_rule(impl: Any, topic_filter: str) -> None:
    tree = impl.TopicTree()
    with pytest.raises(ValueError, match=r"\[MQTT-4\.7\."):
        tree.subscribe(topic_filter, "s", 0)
    with pytest.raises(ValueError, match=r"\[MQTT-4\.7\."):
        tree.unsubscribe(topic_filter, "s")
    assert len(tree) == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_overlapping_subscriptions_give_one_entry_at_the_highest_qos(impl: Any) -> None:
    tree = impl.TopicTree()
    assert tree.subscribe("a/+", "s", 0)
    assert tree.subscribe("a/#", "s", 2)
    assert tree.subscribe("a/b", "s", 1)
    assert tree.subscribe("#", "t", 0)
    assert tree.match("a/b") == {"s": 2, "t": 0}  # [MQTT-3.3.5-1]
    assert not tree.subscribe("a/#", "s", 0)  # a replacement, not a new subscription
    assert tree.match("a/b") == {"s": 1, "t": 0}
    assert len(tree) == 4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_matches_follow_subscribe_and_unsubscribe(impl: Any) -> None:
    tree = impl.TopicTree()
    assert tree.match("x/y") == {}
    tree.subscribe("x/+", "s", 1)
    assert tree.match("x/y") == {"s": 1}  # the cached empty match was dropped
    assert not tree.unsubscribe("x/y", "s")
    assert not tree.unsubscribe("x/+", "other")
    assert not tree.unsubscribe("x/+/z", "s")
    assert tree.unsubscribe("x/+", "s")
    assert tree.match("x/y") == {}
    assert len(tree) == 0


def test_unsubscribing_everything_leaves_an_empty_tree() -> None:
    tree = topic_tree_py.TopicTree()
    filters = ["a/b/c", "a/b/#", "a/+/c", "#", "+", "a", "/x/", "$SYS/#"]
    for i, f in enumerate(filters):
        tree.subscribe(f, i, 0)
    for i, f in enumerate(filters):
        assert tree.unsubscribe(f, i)
    assert len(tree) == 0
    root = tree._root
    assert root.children == {} and root.subs is None and root.multi is None


LEVELS = ["a", "b", "", "$x", "c d", "é"]


def random_topic(rng: random.Random) -> str:
    return "/".join(rng.choice(LEVELS) for _ in range(rng.randint(1, 4))) or "a"  # (a topic name is never empty)


def random_filter(rng: random.Random) -> str:
    levels = [rng.choice([*LEVELS, "+", "+"]) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        levels[-1] = "#"
    return "/".join(levels) or "+"  # (nor is a filter)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("seed", range(5))
def test_random_subscriptions_match_as_the_spec_says(impl: Any, seed: int) -> None:
    rng = random.Random(seed)
    tree = impl.TopicTree()
    held: dict[tuple[str, int], int] = {}  # (filter, subscriber) -> qos
    for step in range(600):
        f, subscriber = random_filter(rng), rng.randrange(8)
        if rng.random() < 0.65:
            qos = rng.randrange(3)
            assert tree.subscribe(f, subscriber, qos) == ((f, subscriber) not in held)
            held[(f, subscriber)] = qos
        else:
            assert tree.unsubscribe(f, subscriber) == ((f, subscriber) in held)
            held.pop((f, subscriber), None)
        assert len(tree) == len(held)
        for _ in range(3):
            topic = random_topic(rng)
            expected: dict[int, int] = {}
            for (hf, hs), qos in held.items():
                if brute_force_matches(hf, topic) and expected.get(hs, -1) < qos:
                    expected[hs] = qos
            assert tree.match(topic) == expected, (step, topic)


def test_the_twins_agree() -> None:
    rng = random.Random(42)
    trees = [native.topic_tree.TopicTree(), topic_tree_py.TopicTree()]
    for _ in range(2000):
        f, subscriber, qos = random_filter(rng), rng.randrange(16), rng.randrange(3)
        if rng.random() < 0.7:
            results = {tree.subscribe(f, subscriber, qos) for tree in trees}
        else:
            results = {tree.unsubscribe(f, subscriber) for tree in trees}
        assert len(results) == 1
        topic = random_topic(rng)
        assert trees[0].match(topic) == trees[1].match(topic)
