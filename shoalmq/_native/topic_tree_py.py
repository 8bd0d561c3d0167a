"""Pure-Python twin of ``topic_tree.pyx``: MQTT subscriptions by topic filter, matched level by level."""

from __future__ import annotations

from typing import Any

#: Topics whose match is kept until the next change to the subscriptions (then all are dropped).
CACHE_SIZE = 4096


def check_filter(topic_filter: str) -> list[str]:
    """The levels of a valid MQTT topic filter; ``ValueError`` naming the rule otherwise."""
    if not topic_filter:
        raise ValueError("empty topic filter [MQTT-4.7.3-1]")
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            raise ValueError(f"'#' must be a whole level and the last: {topic_filter!r} [MQTT-4.7.1-2]")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r} [MQTT-4.7.1-3]")
    return levels


class _Node:
    __slots__ = ("children", "subs", "multi")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        #: subscriber -> QoS of the filters that end at this node.
        self.subs: dict[Any, int] | None = None
        #: subscriber -> QoS of the filters that end with '#' after this node.
        self.multi: dict[Any, int] | None = None


def _merge(result: dict[Any, int], subs: dict[Any, int]) -> None:
    for subscriber, qos in subs.items():
        if result.get(subscriber, -1) < qos:
            result[subscriber] = qos


class TopicTree:
    """Subscriptions (topic filter, subscriber, QoS): ``match`` gives every subscriber with a filter matching a topic
    name, at the highest QoS of its matching filters [MQTT-3.3.5-1]. '+' matches one level, '#' its parent level
    and everything below; a wildcard first level does not match a topic starting with '$' [MQTT-4.7.2-1]. A
    subscriber is any hashable object. Matches are cached per topic until the subscriptions change."""

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0
        self._cache: dict[str, dict[Any, int]] = {}

    def __len__(self) -> int:
        """Subscriptions held (a subscriber's filter counts once, whatever its QoS)."""
        return self._count

    def subscribe(self, topic_filter: str, subscriber: Any, qos: int) -> bool:
        """Add or replace ``subscriber``'s subscription to ``topic_filter``; True if it is new."""
        levels = check_filter(topic_filter)
        node = self._root
        multi = levels[-1] == "#"
        for level in levels[:-1] if multi else levels:
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if multi:
            if node.multi is None:
                node.multi = {}
            subs = node.multi
        else:
            if node.subs is None:
                node.subs = {}
            subs = node.subs
        new = subscriber not in subs
        subs[subscriber] = qos
        self._count += new
        self._cache.clear()
        return new

    def unsubscribe(self, topic_filter: str, subscriber: Any) -> bool:
        """Remove ``subscriber``'s subscription to ``topic_filter``; True if there was one."""
        levels = check_filter(topic_filter)
        multi = levels[-1] == "#"
        path = [self._root]
        for level in levels[:-1] if multi else levels:
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        subs = node.multi if multi else node.subs
        if subs is None or subscriber not in subs:
            return False
        del subs[subscriber]
        if not subs:
            if multi:
                node.multi = None
            else:
                node.subs = None
        self._count -= 1
        self._cache.clear()
        # Drop the nodes left empty, deepest first.
        walked = levels[:-1] if multi else levels
        for depth in range(len(path) - 1, 0, -1):
            node = path[depth]
            if node.children or node.subs is not None or node.multi is not None:
                break
            del path[depth - 1].children[walked[depth - 1]]
        return True

    def match(self, topic: str) -> dict[Any, int]:
        """subscriber -> QoS for every subscriber with a filter matching the topic name ``topic`` (the highest QoS
        of its matching filters). The dict is shared with later calls: do not change it."""
        found = self._cache.get(topic)
        if found is not None:
            return found
        result: dict[Any, int] = {}
        levels = topic.split("/")
        depth = len(levels)
        dollar = topic.startswith("$")
        stack = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if node.multi is not None and not (dollar and i == 0):
                _merge(result, node.multi)
            if i == depth:
                if node.subs is not None:
                    _merge(result, node.subs)
                continue
            children = node.children
            if not children:
                continue
            child = children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            if not (dollar and i == 0):
                child = children.get("+")
                if child is not None:
                    stack.append((child, i + 1))
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[topic] = result
        return result
