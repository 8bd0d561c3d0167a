"""A queue's settings, and how the configuration file gives them.

Kept apart from the queue manager so that reading a configuration (``broker --help``, ``broker cluster status``)
loads no storage engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from shoalmq.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
DLQ_SUFFIX = ".dlq"
DISPATCH_STRATEGIES = ("least_inflight", "round_robin", "random")
REPLICATION_MODES = ("sync", "async")
#: Most replicas of a partition.
MAX_REPLICATION_FACTOR = 7
#: The replication factor of a queue created in a cluster when its settings give none.
CLUSTER_REPLICATION_FACTOR = 3


@dataclass(frozen=True)
class QueueConfig:
    """A queue's settings; ``partitions`` is fixed once the queue exists."""

    partitions: int = 8
    #: Most unacked messages per partition; None: unbounded.
    max_depth: int | None = None
    #: Seconds a message may wait for delivery; None: forever.
    ttl: float | None = None
    #: Deliveries before a message moves to ``<name>.dlq``; 0: never.
    max_deliveries: int = 20
    #: Seconds a consumer has to ack a delivery before it is given to another.
    ack_timeout: float = 60.0
    #: Largest payload accepted, in bytes.
    max_payload: int = 256 * 1024
    #: How a message picks among the consumers with room: ``least_inflight`` (fewest unacknowledged, ties in
    #: turn), ``round_robin`` (in turn), ``random``.
    dispatch: str = "least_inflight"
    #: Copies of each partition on different nodes (a leader and followers); 1: the partition lives on its
    #: owner's disk alone. Capped at the live nodes when a partition is placed, grown back as nodes join.
    #: 0 (not given): ``CLUSTER_REPLICATION_FACTOR`` in a cluster, 1 on a single node (``resolved``).
    replication_factor: int = 0
    #: Replicas (the leader included) that must have a message on disk before it is acknowledged; 0: 2 when the
    #: replication factor is 2 or more (capped at the replicas a partition has).
    min_insync: int = 0
    #: ``sync``: acknowledge once ``min_insync`` replicas have the message on disk; ``async``: once the leader has
    #: (faster; a leader that dies with its disk loses what its followers had not copied yet).
    replication: str = "sync"
    #: Milliseconds an in-sync follower may stay behind its leader before it leaves the in-sync set.
    replica_lag_ms: int = 1000

    def resolved(self, clustered: bool) -> QueueConfig:
        """These settings with the replication factor given (see ``replication_factor``)."""
        if self.replication_factor:
            return self
        return replace(self, replication_factor=CLUSTER_REPLICATION_FACTOR if clustered else 1)

    @property
    def min_insync_replicas(self) -> int:
        """``min_insync`` with its default applied (not capped at a partition's replicas)."""
        if self.min_insync:
            return self.min_insync
        return 2 if self.replication_factor >= 2 else 1

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCH_STRATEGIES:
            raise ConfigError(f"dispatch must be one of {', '.join(DISPATCH_STRATEGIES)}, got {self.dispatch!r}")
        if self.replication not in REPLICATION_MODES:
            raise ConfigError(f"replication must be one of {', '.join(REPLICATION_MODES)}, "
                              f"got {self.replication!r}")
        checks = [
            (self.partitions, 1, 4096, "partitions"),
            (self.max_deliveries, 0, 254, "max_deliveries"),
            (self.max_payload, 0, 256 << 20, "max_payload"),
            (self.replication_factor, 0, MAX_REPLICATION_FACTOR, "replication_factor"),
            (self.min_insync, 0, MAX_REPLICATION_FACTOR, "min_insync"),
            (self.replica_lag_ms, 100, 600_000, "replica_lag_ms"),
        ]
        for value, low, high, name in checks:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
        if self.max_depth is not None and (isinstance(self.max_depth, bool) or not isinstance(self.max_depth, int)
                                           or self.max_depth < 1):
            raise ConfigError(f"max_depth must be a positive whole number, got {self.max_depth!r}")
        for name in ("ttl", "ack_timeout"):
            value = getattr(self, name)
            if value is None and name == "ttl":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.replication_factor and self.min_insync > self.replication_factor:
            raise ConfigError(f"min_insync ({self.min_insync}) cannot exceed replication_factor "
                              f"({self.replication_factor})")

    @classmethod
    def from_mapping(cls, values: dict, base: QueueConfig | None = None) -> QueueConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown queue setting {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
        return replace(base or cls(), **values)


def queue_configs_from_mapping(values: object) -> dict[str, QueueConfig]:
    """Parse the ``queues:`` section of the configuration file (queue name -> settings)."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError("expected a mapping of queue names to settings")
    out = {}
    for name, settings in values.items():
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"bad queue name {name!r}: 1-128 letters, digits, '.', '_' or '-'")
        try:
            out[name] = queue_config_from_mapping(settings)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return out


def queue_config_from_mapping(settings: object) -> QueueConfig:
    """Parse one queue's settings (the ``queue_defaults:`` section, or an entry of ``queues:``)."""
    if settings is None:
        return QueueConfig()
    if not isinstance(settings, dict):
        raise ConfigError("expected a mapping of queue settings")
    return QueueConfig.from_mapping(settings)
