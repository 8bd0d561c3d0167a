"""Matching a topic against the subscriptions of ordinary topics, compiled vs pure Python (run: make bench).

The tree holds 10,000 subscriptions in the shape of a fleet of devices: each of 9,000 subscribes to its own
command topic (``devices/<id>/cmd``), 999 dashboards to wildcard filters (``devices/+/status``,
``devices/<group>/#``), and one to ``#``. A match runs once per distinct topic of a batch of publishes; the cache
keeps it until the subscriptions change, so both a miss (a topic not seen since the last change) and a hit count.
"""

import random

import pytest

from shoalmq._native import topic_tree, topic_tree_py

TOPICS = [f"devices/{i}/status" for i in range(0, 9000, 7)] + [f"devices/{i}/cmd" for i in range(0, 9000, 11)]


def fleet(impl):
    tree = impl.TopicTree()
    for i in range(9000):
        tree.subscribe(f"devices/{i}/cmd", f"device{i}", 1)
    for i in range(999):
        tree.subscribe("devices/+/status" if i % 3 == 0 else f"devices/{i % 90 * 100 // 100}/#", f"dash{i}", i % 3)
    tree.subscribe("#", "logger", 0)
    return tree


@pytest.mark.parametrize("impl", [topic_tree, topic_tree_py], ids=["native", "pure"])
def test_match_a_topic_not_cached(benchmark, impl) -> None:
    tree = fleet(impl)
    rng = random.Random(1)
    topics = TOPICS[:]
    rng.shuffle(topics)

    def run() -> int:
        found = 0
        for topic in topics:
            tree.subscribe("bench/cache-drop", "x", 0)  # each change drops the cache: every match below misses
            found += len(tree.match(topic))
        return found
    assert benchmark(run) > len(topics)


@pytest.mark.parametrize("impl", [topic_tree, topic_tree_py], ids=["native", "pure"])
def test_match_a_cached_topic(benchmark, impl) -> None:
    tree = fleet(impl)
    for topic in TOPICS:
        tree.match(topic)
    assert benchmark(lambda: sum(len(tree.match(topic)) for topic in TOPICS)) > len(TOPICS)
