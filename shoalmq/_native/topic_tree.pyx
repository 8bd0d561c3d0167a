# cython: language_level=3
"""MQTT subscriptions by topic filter, matched level by level: the subscription engine of ordinary topics.

Compiled twin of ``topic_tree_py.py`` (same interface and behaviour; the tests run both).
"""

from typing import Any

#: Topics whose match is kept until the next change to the subscriptions (then all are dropped).
CACHE_SIZE = 4096

__all__ = ["CACHE_SIZE", "TopicTree", "check_filter"]


cpdef list check_filter(str topic_filter):
    """The levels of a valid MQTT topic filter; ``ValueError`` naming the rule otherwise."""
    if not topic_filter:
        raise ValueError("empty topic filter [MQTT-4.7.3-1]")
    cdef list levels = topic_filter.split("/")
    cdef Py_ssize_t last = len(levels) - 1, i
    cdef str level
    for i in range(last + 1):
        level = levels[i]
        if "#" in level and (level != "#" or i != last):
            raise ValueError(f"'#' must be a whole level and the last: {topic_filter!r} [MQTT-4.7.1-2]")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r} [MQTT-4.7.1-3]")
    return levels


cdef class _Node:
    cdef dict children
    cdef dict subs   # subscriber -> QoS of the filters that end at this node (None: none)
    cdef dict multi  # subscriber -> QoS of the filters that end with '#' after this node (None: none)

    def __cinit__(self):
        self.children = {}
        self.subs = None
        self.multi = None


cdef inline void _merge(dict result, dict subs):
    cdef object subscriber, qos, held
    for subscriber, qos in subs.items():
        held = result.get(subscriber)
        if held is None or held < qos:
            result[subscriber] = qos


cdef class TopicTree:
    """Subscriptions (topic filter, subscriber, QoS): ``match`` gives every subscriber with a filter matching a topic
    name, at the highest QoS of its matching filters [MQTT-3.3.5-1]. '+' matches one level, '#' its parent level
    and everything below; a wildcard first level does not match a topic starting with '$' [MQTT-4.7.2-1]. A
    subscriber is any hashable object. Matches are cached per topic until the subscriptions change."""

    cdef _Node _root
    cdef Py_ssize_t _count
    cdef dict _cache

    def __cinit__(self):
        self._root = _Node()
        self._count = 0
        self._cache = {}

    def __len__(self):
        """Subscriptions held (a subscriber's filter counts once, whatever its QoS)."""
        return self._count

    def subscribe(self, str topic_filter, subscriber, int qos):
        """Add or replace ``subscriber``'s subscription to ``topic_filter``; True if it is new."""
        cdef list levels = check_filter(topic_filter)
        cdef Py_ssize_t n = len(levels)
        cdef _Node node = self._root, child
        cdef bint multi = levels[n - 1] == "#"
        cdef str level
        cdef dict subs
        for level in (levels[:n - 1] if multi else levels):
            child = node.children.get(level)
            if child is None:
                child = _Node()
                node.children[level] = child
            node = child
        if multi:
            if node.multi is None:
                node.multi = {}
            subs = node.multi
        else:
            if node.subs is None:
                node.subs = {}
            subs = node.subs
        cdef bint new = subscriber not in subs
        subs[subscriber] = qos
        self._count += new
        self._cache.clear()
        return new

    def unsubscribe(self, str topic_filter, subscriber):
        """Remove ``subscriber``'s subscription to ``topic_filter``; True if there was one."""
        cdef list levels = check_filter(topic_filter)
        cdef Py_ssize_t n = len(levels)
        cdef bint multi = levels[n - 1] == "#"
        cdef list walked = levels[:n - 1] if multi else levels
        cdef list path = [self._root]
        cdef _Node node = self._root, child
        cdef str level
        for level in walked:
            child = node.children.get(level)
            if child is None:
                return False
            path.append(child)
            node = child
        cdef dict subs = node.multi if multi else node.subs
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
        cdef Py_ssize_t depth
        for depth in range(len(path) - 1, 0, -1):
            node = path[depth]
            if node.children or node.subs is not None or node.multi is not None:
                break
            del (<_Node>path[depth - 1]).children[walked[depth - 1]]
        return True

    def match(self, str topic):
        """subscriber -> QoS for every subscriber with a filter matching the topic name ``topic`` (the highest QoS
        of its matching filters). The dict is shared with later calls: do not change it."""
        cdef dict found = self._cache.get(topic)
        if found is not None:
            return found
        cdef dict result = {}
        cdef list levels = topic.split("/")
        cdef Py_ssize_t depth = len(levels), i
        cdef bint dollar = topic.startswith("$")
        cdef list stack = [self._root, 0]
        cdef _Node node, child
        cdef dict children
        while stack:
            i = stack.pop()
            node = stack.pop()
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
                stack.append(child)
                stack.append(i + 1)
            if not (dollar and i == 0):
                child = children.get("+")
                if child is not None:
                    stack.append(child)
                    stack.append(i + 1)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[topic] = result
        return result
