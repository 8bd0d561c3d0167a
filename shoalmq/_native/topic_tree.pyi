"""MQTT subscriptions by topic filter, matched level by level: the subscription engine of ordinary topics."""

from typing import Any

CACHE_SIZE: int

def check_filter(topic_filter: str) -> list[str]:
    """The levels of a valid MQTT topic filter; ``ValueError`` naming the rule otherwise."""

class TopicTree:
    """Subscriptions (topic filter, subscriber, QoS); ``match`` gives every subscriber whose filters match a topic
    name, at the highest QoS of its matching filters."""

    def __len__(self) -> int: ...
    def subscribe(self, topic_filter: str, subscriber: Any, qos: int) -> bool: ...
    def unsubscribe(self, topic_filter: str, subscriber: Any) -> bool: ...
    def match(self, topic: str) -> dict[Any, int]: ...
