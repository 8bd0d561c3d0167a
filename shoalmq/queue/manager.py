"""The queue manager: named queues over partition logs, and competing consumers with windows, acks and redelivery.

It knows no MQTT: the front end hands it publishes (a topic and a payload) and consumers (anything with a
``deliver`` method and a window), and reports acks, unsubscribes and disconnects. Its interface is batch-shaped:
``publish`` returns the shared completion of the next commit, and deliveries reach a consumer as one list per
dispatch, so a front end can write them with one socket write.

Topics. ``$queue/<name>`` or ``$queue/<name>/<key...>`` addresses queue ``<name>`` (1-128 letters, digits, ``.``,
``_``, ``-``). A key picks the partition by FNV-1a, so one key's messages stay in order; without a key, each
publish (or each run of them that ``publish_many`` stores: a client's publishes to one topic in one socket read)
goes to the next partition in turn. The stored record is ``key length u16 | key | payload``
(``shoalmq.queue.record``), so a message is delivered with the topic it was published on.

Dispatch. Committed messages are taken from the partitions (round-robin, so no partition starves) and handed to the
online consumer with the fewest unacknowledged messages, never beyond its window. A consumer's ack deletes the
message; a consumer that unsubscribes or goes away, or does not ack within ``ack_timeout``, has its messages put back
at the head of their partitions; they are delivered again (``dup`` set) to whoever is online. A message handed back
after its ``max_deliveries``-th delivery moves to the queue ``<name>.dlq`` instead (the original is acked once the
copy is durable; one found over the limit when taken, after a restart, moves then). Dead-letter queues do not
dead-letter further.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from shoalmq._native import partition_of
from shoalmq.errors import ConfigError, NotOwner, PayloadTooLarge, QueueError, ShoalError
from shoalmq.logs import Progress
from shoalmq.queue.config import DLQ_SUFFIX, NAME_PATTERN, QueueConfig
from shoalmq.queue.record import encode_record, payload_size, split_record
from shoalmq.queue.storage import Limits, Message, PartitionLog, Store

log = logging.getLogger(__name__)

QUEUE_PREFIX = "$queue/"
#: Offsets and high-water marks are signed 64-bit in the ring and the log: a transfer naming one past it is refused.
MAX_OFFSET = 1 << 63
#: The largest delivery count a partition log stores (255 marks an acked message).
MAX_DELIVERIES_KEPT = 254
#: Seconds between attempts to store a dead-letter copy when the disk refused it.
DEAD_LETTER_RETRY = 0.5
MAX_KEY = 0xFFFF
#: Checked ``$queue/`` topics remembered (the cache starts over when full), if at most this long (characters).
TOPIC_CACHE = 4096
CACHED_TOPIC_MAX = 256
#: Seconds between log lines about a queue's expired messages.
EXPIRY_LOG_INTERVAL = 10.0
#: Messages a purge or a redrive takes in one step (the loop runs other work between steps).
ADMIN_BATCH = 2000


class BadQueueName(QueueError):
    """The topic does not name a queue (``$queue/<name>`` with a valid name)."""


def check_payload(name: str, config: QueueConfig, size: int) -> None:
    """PayloadTooLarge unless a payload of ``size`` bytes fits queue ``name``'s ``max_payload``."""
    if size > config.max_payload:
        raise PayloadTooLarge(f"payload of {size} bytes exceeds max_payload {config.max_payload} of queue {name!r}")


def limits_of(config: QueueConfig) -> Limits:
    """The limits a queue's partitions enforce."""
    # The stored record carries the key too: the payload limit is checked here, the log's is a backstop.
    return Limits(max_depth=config.max_depth, ttl=config.ttl, max_payload=config.max_payload + 2 + MAX_KEY)


def parse_queue_topic(topic: str) -> tuple[str, str]:
    """Split ``$queue/<name>[/<key>]`` into (name, key); BadQueueName if it is not a valid queue topic."""
    if not topic.startswith(QUEUE_PREFIX):
        raise BadQueueName(f"{topic!r} is not a $queue/ topic")
    name, _, key = topic[len(QUEUE_PREFIX):].partition("/")
    if not NAME_PATTERN.fullmatch(name) and not (
            name.endswith(DLQ_SUFFIX) and NAME_PATTERN.fullmatch(name[:-len(DLQ_SUFFIX)])):
        raise BadQueueName(f"bad queue name {name!r} in {topic!r}: 1-128 letters, digits, '.', '_' or '-'")
    return name, key


def is_queue_topic(topic: str) -> bool:
    return topic.startswith(QUEUE_PREFIX)


def queue_of_filter(topic_filter: str) -> str | None:
    """The queue a subscription filter consumes (``$queue/<name>`` or ``$queue/<name>/#``), else None.

    BadQueueName for a ``$queue/`` filter of another shape."""
    if not topic_filter.startswith(QUEUE_PREFIX):
        return None
    name, key = parse_queue_topic(topic_filter)
    if key not in ("", "#"):
        raise BadQueueName(f"a queue is consumed whole: subscribe to $queue/{name} or $queue/{name}/#, "
                           f"not {topic_filter!r}")
    if "+" in name or "#" in name:
        raise BadQueueName(f"bad queue name {name!r}")
    return name


class UnknownQueue(QueueError):
    """No queue of that name exists (administration names an existing queue)."""


class QueueInUse(QueueError):
    """The queue cannot be deleted now (it has consumers, or messages still being written)."""


class QueueUndefined(QueueError):
    """On a cluster: the queue is not defined in the cluster yet (the manager defines it, then retries)."""


class Cluster(Protocol):
    """What the manager needs from the cluster (``shoalmq.cluster.coordinator.Coordinator``)."""

    def queue_config(self, name: str) -> QueueConfig | None:
        """The queue's settings as the cluster records them; None if it is not defined yet."""

    def define(self, name: str, config: QueueConfig) -> asyncio.Future[QueueConfig]:
        """Define the queue in the cluster (unless it is); resolves to the settings every node uses."""

    def writable(self, queue: str, partition: int) -> bool:
        """May this node append to the partition now?"""

    def forward(self, queue: str, partition: int, records: list[bytes]) -> asyncio.Future[None]:
        """Send records, in order, to the partition's owner; resolves once the owner has them on disk."""

    def owned_partitions(self, queue: str) -> list[int]:
        """The queue's partitions this node owns (the ones it delivers from)."""

    def proxies(self, queue: str) -> list[Any]:
        """Sources of the queue's messages held for this node's consumers by other owners (proxy routing)."""


class Ownership(Protocol):
    """The cluster's answer to "may this node write to this partition?"."""

    def check(self, queue: str, partition: int, epoch: int) -> None:
        """Return if this node owns the partition at ``epoch``; raise NotOwner or StaleEpoch otherwise."""


class Consumer(Protocol):
    """What the manager needs from a consumer (an MQTT session subscribed to a queue).

    A consumer with a true ``remote`` attribute is another node's route stream (proxy routing): it is given only
    partitions this node owns, has no ack timeout here, and does not count as a consumer on this node."""

    #: Most unacknowledged deliveries it may hold (across all its queues).
    window: int

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Send these deliveries, all of one queue (one batch; the consumer writes them and later acks them)."""

    def revoke(self, deliveries: list[Delivery]) -> None:
        """These deliveries were taken back (ack timeout, unsubscribe): forget them; a late ack counts for nothing."""


class Delivery:
    """One message handed to one consumer, until acked or handed back."""

    __slots__ = ("_payload", "_topic", "consumer", "deadline", "message", "packet_id", "partition", "queue")

    def __init__(self, queue: Queue, partition: PartitionLog, message: Message, consumer: Consumer,
                 deadline: float) -> None:
        self.queue = queue
        self.partition = partition
        self.message = message
        self.consumer = consumer
        self.deadline = deadline
        #: Set by the consumer (its MQTT packet identifier).
        self.packet_id = 0
        self._topic: str | None = None
        self._payload = b""

    def _split(self) -> None:
        # Split once, and only for a consumer that writes MQTT: another node's route stream sends the record whole.
        key, self._payload = split_record(self.message.payload)
        self._topic = self.queue.topic_for(key)

    @property
    def topic(self) -> str:
        """The topic the message was published on."""
        if self._topic is None:
            self._split()
        return self._topic  # type: ignore[return-value]

    @property
    def payload(self) -> bytes:
        if self._topic is None:
            self._split()
        return self._payload

    @property
    def dup(self) -> bool:
        """Delivered before (to this or another consumer), or maybe: it came back without a count."""
        return self.message.deliveries > 1 or self.message.returned


@dataclass(eq=False)
class _ConsumerState:
    consumer: Consumer
    queues: set[str] = field(default_factory=set)
    #: Its deliveries in flight, in the order they were made (a dict used as an ordered set).
    inflight: dict[Delivery, None] = field(default_factory=dict)
    #: At-most-once subscribers: messages are acked as they are sent.
    at_most_once: set[str] = field(default_factory=set)


class Queue:
    """One named queue: its partitions and its consumers."""

    def __init__(self, manager: QueueManager, name: str, config: QueueConfig) -> None:
        self.manager = manager
        self.name = name
        self.config = config
        limits = limits_of(config)
        self.partitions = [manager.store.partition(name, p, limits) for p in range(config.partitions)]
        self.consumers: list[_ConsumerState] = []
        #: Where dispatch takes messages from: every partition on a single node; on a cluster, the partitions this
        #: node owns (and, in proxy mode, the streams from other owners).
        self.sources: list[Any] = list(self.partitions)
        #: The partitions this node owns (what a consumer on another node may be given).
        self.owned: list[Any] = list(self.partitions)
        self.is_dlq = name.endswith(DLQ_SUFFIX)
        #: ``$queue/<name>`` as bytes: the topic of a message without a key, and the start of the others'.
        self.topic_prefix = (QUEUE_PREFIX + name).encode()
        self._next_partition = 0  # the partition the next unkeyed publish (or run of them) goes to
        self._next_take = 0  # round-robin start for dispatch
        self._remote_first = False  # dispatch alternates between other nodes' route streams and local consumers
        self._next_consumer = 0  # where the next dispatch starts among the consumers (ties rotate)
        self.last_served = 0  # the dispatch round that last gave out a message of this queue
        #: Counts since the node started (``/metrics``): messages given to consumers (and of those, ones given
        #: before), acked by them, moved to the dead-letter queue, removed by a purge, redriven from it (a DLQ).
        self.delivered = 0
        self.redelivered = 0
        self.acked = 0
        self.dead_lettered = 0
        self.purged = 0
        self.redriven = 0

    @property
    def depth(self) -> int:
        return sum(p.depth for p in self.partitions)

    @property
    def expired(self) -> int:
        return sum(p.expired for p in self.partitions)

    def partition_for(self, key: str) -> int:
        """The partition a message with this key goes to: by FNV-1a of the key; without one, the next in turn
        (each call moves the turn on)."""
        if key:
            return partition_of(key.encode(), len(self.partitions))
        index = self._next_partition
        self._next_partition = (index + 1) % len(self.partitions)
        return index

    def publish(self, key: str, payload: bytes, partition: int | None = None) -> asyncio.Future[None]:
        """Append to ``partition`` (by default the one the key picks); the future resolves once durable."""
        self.check_payload(len(payload))
        index = self.partition_for(key) if partition is None else partition
        return self.partition(index).enqueue(encode_record(key.encode(), payload))

    def check_payload(self, size: int) -> None:
        """PayloadTooLarge unless a payload of ``size`` bytes fits the queue's ``max_payload``."""
        check_payload(self.name, self.config, size)

    def partition(self, index: int) -> PartitionLog:
        if not 0 <= index < len(self.partitions):
            raise BadQueueName(f"queue {self.name!r} has no partition {index}")
        return self.partitions[index]

    def topic_for(self, key: bytes) -> str:
        """The topic a message with this key was published on."""
        return f"{QUEUE_PREFIX}{self.name}/{key.decode()}" if key else QUEUE_PREFIX + self.name

    def topic_of(self, record: bytes) -> str:
        """The topic a stored record was published on."""
        return self.topic_for(split_record(record)[0])


class QueueManager:
    """All queues of a node, their consumers, and the dispatch between them."""

    def __init__(self, store: Store, queues: dict[str, QueueConfig] | None = None,
                 defaults: QueueConfig = QueueConfig(), consumer_window: int = 128) -> None:
        self.store = store
        self.defaults = defaults
        self.consumer_window = consumer_window
        self._declared = dict(queues or {})
        self._queues: dict[str, Queue] = {}
        self._consumers: dict[int, _ConsumerState] = {}  # id(consumer) -> state
        self._dispatch_scheduled: set[Queue] = set()
        self._dispatch_round = 0
        self._loop = asyncio.get_running_loop()
        self._by_pid: dict[int, Queue] = {}
        self._rng = random.Random()  # the "random" dispatch strategy
        #: Who owns which partition (set on a cluster; None in the embedded single node: every partition is ours).
        self.ownership: Ownership | None = None
        #: The cluster this node is part of (None: the embedded single node).
        self.cluster: Cluster | None = None
        self._waiting_for_definition: dict[str, list[tuple[Any, Any]]] = {}
        #: Called with (queue, the window of its consumers on this node together) when they change (proxy routing).
        self.on_consumers_changed: Any = None
        self._ack_timer: asyncio.TimerHandle | None = None
        #: The replicated partitions' side (``shoalmq.cluster.replication.Replicator``; None: none here).
        self.replication: Any = None
        #: Checked ``$queue/`` topics: topic -> (queue name, key, record head ``u16 key length | key``).
        self._topics: dict[str, tuple[str, str, bytes]] = {}
        #: Whether a client's publish or subscription creates a queue on first use, and at most how many queues
        #: (0: no limit) this node then holds (``creation_refused``; a dead-letter queue is always created).
        self.auto_create = True
        self.max_queues = 0
        #: Queue name -> messages expired since the last expiry log line (see ``_expired``).
        self._expiries: dict[str, list[int]] = {}
        #: Called with a queue's name when it is opened here on a cluster (the cluster records which incarnation
        #: of the queue this node's copy is).
        self.on_queue_opened: Any = None
        #: Queue name -> consumers subscribed here when the cluster deleted it, given it again if it comes back
        #: (``drop``), with whether each is at most once.
        self._orphans: dict[str, dict[int, tuple[Consumer, bool]]] = {}
        store.on_readable = self._on_readable
        for name in self._declared:
            self.queue(name)
        # Queues stored before (created on first use in an earlier run) come back with their stored settings.
        stored = store.queue_names()
        progress = Progress(log, "opening the stored queues", len(store.known_partitions()), "partitions")
        opened = messages = 0
        for name in stored:
            queue = self.queue(name)
            opened, messages = opened + len(queue.partitions), messages + queue.depth
            progress.step(opened, f", {messages:,} messages")
        self._arm_ack_timer()

    # -- queues -----------------------------------------------------------------------------------------

    def queue(self, name: str) -> Queue:
        """The queue ``name``, created with its declared or default settings on first use.

        ConfigError if the stored partition count differs from the declared one: a queue's partitions never
        change silently."""
        queue = self._queues.get(name)
        if queue is not None:
            return queue
        if not NAME_PATTERN.fullmatch(name) and not (
                name.endswith(DLQ_SUFFIX) and NAME_PATTERN.fullmatch(name[:-len(DLQ_SUFFIX)])):
            raise BadQueueName(f"bad queue name {name!r}")
        stored = self.store.queue_definition(name)
        config = self._declared.get(name)
        if self.cluster is not None:
            config = self.cluster.queue_config(name)
            if config is None:
                self._define_in_cluster(name)
                raise QueueUndefined(f"queue {name!r} is being defined in the cluster")
        if stored is not None:
            stored_partitions = stored["partitions"]
            if config is not None and config.partitions != stored_partitions:
                raise ConfigError(f"queue {name!r} has {stored_partitions} partitions in the data directory but "
                                  f"{config.partitions} in the configuration; a queue's partition count cannot change")
            if config is None:
                config = replace(self.defaults, partitions=stored_partitions)
        if config is None:
            config = self.defaults
            if name.endswith(DLQ_SUFFIX):
                base = self._declared.get(name[:-len(DLQ_SUFFIX)], self.defaults)
                config = replace(base, max_deliveries=0, max_depth=None)
        if stored is None:
            self.store.define_queue(name, {"partitions": config.partitions, "created": int(time.time())})
        queue = Queue(self, name, config)
        self._queues[name] = queue
        for part in queue.partitions:
            self._by_pid[part.pid] = queue
        if self.cluster is not None:
            self.refresh_sources(queue)
            if self.on_queue_opened is not None:
                self.on_queue_opened(name)
        for consumer, at_most_once in self._orphans.pop(name, {}).values():
            self.subscribe(consumer, name, at_most_once)
        return queue

    def known(self, name: str) -> bool:
        """Whether ``name`` is a queue already: open here, declared, stored, or defined in the cluster."""
        return (name in self._queues or name in self._declared or self.store.queue_definition(name) is not None
                or (self.cluster is not None and self.cluster.queue_config(name) is not None))

    def creation_refused(self, name: str) -> str | None:
        """Why a client may not create queue ``name`` on first use (None: it exists, or may be created)."""
        if name in self._queues or self.known(name):
            return None
        if name.endswith(DLQ_SUFFIX) and not self.known(name[:-len(DLQ_SUFFIX)]):
            return f"queue {name!r} does not exist: a dead-letter queue comes with its queue"
        if not self.auto_create:
            return f"queue {name!r} does not exist, and auto_create_queues is off"
        if self.max_queues and len(self._queues) >= self.max_queues:
            return f"queue {name!r} does not exist, and this node holds max_queues ({self.max_queues}) already"
        return None

    def adopt_config(self, name: str, config: QueueConfig) -> None:
        """Serve an open queue with the settings the cluster recorded (same partition count; the limits may
        differ from this node's configuration)."""
        queue = self._queues[name]
        if config.partitions != len(queue.partitions):
            raise ConfigError(f"queue {name!r} has {config.partitions} partitions in the cluster but "
                              f"{len(queue.partitions)} here")
        if config != queue.config:
            queue.config = config
            limits = limits_of(config)
            for part in queue.partitions:
                part.set_limits(limits)

    def local_config(self, name: str) -> QueueConfig:
        """The settings this node would give a new queue: declared, else the defaults (a DLQ: its queue's)."""
        config = self._declared.get(name)
        if config is not None:
            return config
        if name.endswith(DLQ_SUFFIX):
            base = self._declared.get(name[:-len(DLQ_SUFFIX)], self.defaults)
            return replace(base, max_deliveries=0, max_depth=None)
        return self.defaults

    def _define_in_cluster(self, name: str) -> None:
        """Start defining the queue in the cluster; what waits for it runs once it is defined."""
        assert self.cluster is not None
        if name in self._waiting_for_definition:
            return
        self._waiting_for_definition[name] = []
        defined = self.cluster.define(name, self.local_config(name))

        def done(future: asyncio.Future[QueueConfig]) -> None:
            waiting = self._waiting_for_definition.pop(name, [])
            error = future.exception()
            if error is not None and not isinstance(error, ShoalError):
                error = QueueError(f"cannot define queue {name!r} in the cluster: {error}")
            for run, fail in waiting:
                if error is None:
                    run()
                else:
                    fail(error)

        defined.add_done_callback(done)

    def _when_defined(self, name: str, run: Any, fail: Any) -> None:
        self._define_in_cluster(name)
        self._waiting_for_definition[name].append((run, fail))

    def refresh_sources(self, queue: Queue | None = None) -> None:
        """On a cluster: deliver from the partitions this node owns now (call when ownership changes)."""
        if self.cluster is None:
            return
        for q in [queue] if queue is not None else list(self._queues.values()):
            owned = self.cluster.owned_partitions(q.name)
            q.owned = [q.partitions[i] for i in owned if i < len(q.partitions)]
            proxies = self.cluster.proxies(q.name)
            for proxy in proxies:
                self._by_pid[proxy.pid] = q
            q.sources = q.owned + proxies
            if q.consumers:
                self._schedule_dispatch(q)

    def source_readable(self, queue_name: str, refresh: bool = False) -> None:
        """Messages arrived in a source that is not a local partition (proxy routing)."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return
        if refresh:
            self.refresh_sources(queue)
        if queue.consumers:
            self._schedule_dispatch(queue)

    def take_back(self, queue_name: str, index: int) -> int:
        """Requeue every delivery of one partition held by any consumer (the partition is moving to another node;
        a late ack counts for nothing, the new owner delivers the message again). Not counted as delivery
        attempts: the broker moved them, no consumer failed. Returns how many."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return 0
        part = queue.partitions[index]
        held = [d for s in self._consumers.values() for d in s.inflight if d.partition is part]
        self._requeue(held, counted=False)
        return len(held)

    def held(self, queue_name: str, index: int) -> int:
        """Deliveries of one partition held by consumers (local ones and other nodes' route streams)."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return 0
        return queue.partitions[index].inflight

    def hand_back(self, deliveries: list[Delivery], counted: bool = True) -> None:
        """Put deliveries back in their partitions (to be delivered again). ``counted``: a consumer ended holding
        them (the attempt counts toward ``max_deliveries``); False: they never reached one."""
        self._requeue(deliveries, counted)

    # -- what the cluster drives (forwarding, handoff, load) -------------------------------------------------

    def append(self, queue_name: str, index: int, records: list[bytes]) -> asyncio.Future[None]:
        """Append records in the stored form to one partition of this node, in order, all or none; the future
        resolves once they are durable (committed, for a replicated partition). For forwarded publishes that found
        this node their partition's owner."""
        part = self.queue(queue_name).partition(index)
        return self._committed(part, part.enqueue_many(records))

    def export(self, queue_name: str, index: int, max_count: int) -> list[Message]:
        """Take up to ``max_count`` ready messages of a partition out to move them to another node (a handoff, or
        messages left here for a partition another node owns). Each must be settled with ``exported``."""
        return self.queue(queue_name).partition(index).take(max_count)

    def exported(self, queue_name: str, index: int, offsets: list[int], moved: bool) -> None:
        """The messages ``export`` gave out are on the other node's disk (``moved``: deleted here), or are not
        (they are ready here again, their delivery count as it was)."""
        part = self.queue(queue_name).partition(index)
        if moved:
            part.ack(offsets)
        else:
            part.nack(offsets, counted=False)

    def set_epoch(self, queue_name: str, index: int, epoch: int) -> None:
        """Record with the partition the epoch at which this node came to own it (kept if a higher one is stored:
        an etcd started afresh counts its revisions from 1 again)."""
        part = self.queue(queue_name).partition(index)
        if epoch > part.epoch:
            part.set_epoch(epoch)

    def next_offset(self, queue_name: str, index: int) -> int:
        """A partition's high-water mark here: the offset its next message gets."""
        return self.queue(queue_name).partition(index).next_offset

    def ready(self, queue_name: str, index: int) -> int:
        """Messages of a partition stored here and ready (not in flight)."""
        queue = self._queues.get(queue_name)
        return queue.partitions[index].ready if queue is not None else 0

    def depths(self) -> dict[str, list[int]]:
        """Queue name -> the number of messages stored here for each of its partitions (ready or in flight)."""
        return {name: [p.depth for p in q.partitions] for name, q in self._queues.items()}

    async def flush(self) -> None:
        """Wait until everything stored or changed so far is committed (StorageError if a commit fails)."""
        await self.store.flush()

    def _consumers_changed(self, names: Iterable[str]) -> None:
        if self.on_consumers_changed is None:
            return
        for name in names:
            queue = self._queues.get(name)
            total = sum(s.consumer.window for s in queue.consumers
                        if not getattr(s.consumer, "remote", False)) if queue else 0
            self.on_consumers_changed(name, total)

    def queues(self) -> list[Queue]:
        return list(self._queues.values())

    def describe(self) -> dict[str, dict]:
        """Queue name -> settings and counts (for logs and status)."""
        return {name: {**asdict(q.config), "depth": q.depth, "consumers": len(q.consumers),
                       "expired": q.expired, "dead_lettered": q.dead_lettered}
                for name, q in sorted(self._queues.items())}

    # -- publishing -------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        """Enqueue a message published on a ``$queue/`` topic; the future resolves once it is durable.

        Raises BadQueueName, PayloadTooLarge, QueueFull or StorageError: the publish must not be acknowledged."""
        return self.publish_many(topic, [payload])

    def publish_many(self, topic: str, payloads: list[bytes]) -> asyncio.Future[None]:
        """Enqueue messages published on one ``$queue/`` topic, in order, into one partition: the batch form of
        ``publish``, with the topic checked once and the messages appended in one call. One future, resolved once
        every message is durable (on a cluster, once the partition's owner has them). Stored whole or not at all:
        BadQueueName, PayloadTooLarge, or (a partition of this node) QueueFull or StorageError are raised before
        anything is stored."""
        target = self._topics.get(topic)
        if target is None:
            target = self._check_topic(topic)
        name, key, head = target
        if not payloads:
            return _all_of(self._loop, [])
        queue = self._queues.get(name)
        if queue is None:
            # (A publish the new queue would refuse does not create it.)
            config = self.cluster.queue_config(name) if self.cluster is not None else None
            check_payload(name, config or self.local_config(name), max(map(len, payloads)))
            try:
                queue = self.queue(name)
            except QueueUndefined:
                return _all_of(self._loop, [self._publish_when_defined(name, topic, p) for p in payloads])
        queue.check_payload(max(map(len, payloads)))
        records = [head + p for p in payloads]
        # A key picks its partition; a run without one goes whole to the next partition in turn, so that a commit
        # writes one segment for it (not one per partition) and a forwarded run is one group.
        index = queue.partition_for(key)
        cluster = self.cluster
        if cluster is None or cluster.writable(name, index):
            part = queue.partitions[index]
            return self._committed(part, part.enqueue_many(records))
        return cluster.forward(name, index, records)

    def _committed(self, part: PartitionLog, flush: asyncio.Future[None]) -> asyncio.Future[None]:
        """What a publish just appended to ``part`` waits for: its commit (``flush``), or for a replicated
        partition, its commit on every in-sync replica."""
        if part.replicated:
            return self.replication.committed(part, part.last_offset, flush)
        return flush

    def _check_topic(self, topic: str) -> tuple[str, str, bytes]:
        name, key = parse_queue_topic(topic)
        if len(topic.encode()) > 0xFFFF - len(DLQ_SUFFIX):
            raise BadQueueName(f"queue topic longer than {0xFFFF - len(DLQ_SUFFIX)} bytes (room is kept for .dlq)")
        target = (name, key, encode_record(key.encode(), b""))
        if len(topic) <= CACHED_TOPIC_MAX:
            if len(self._topics) >= TOPIC_CACHE:
                self._topics.clear()
            self._topics[topic] = target
        return target

    def _publish_when_defined(self, name: str, topic: str, payload: bytes) -> asyncio.Future[None]:
        """The first publishes to a queue new to the cluster wait for its definition (one future each)."""
        outer: asyncio.Future[None] = self._loop.create_future()

        def chain(inner: asyncio.Future[None]) -> None:
            if outer.done():
                return
            if inner.exception() is not None:
                outer.set_exception(inner.exception())  # type: ignore[arg-type]
            else:
                outer.set_result(None)

        def run() -> None:
            try:
                self.publish(topic, payload).add_done_callback(chain)
            except ShoalError as exc:
                fail(exc)

        def fail(error: BaseException) -> None:
            if not outer.done():
                outer.set_exception(error)

        self._when_defined(name, run, fail)
        return outer

    def enqueue_remote(self, batches: Sequence[Any]) -> asyncio.Future[None]:
        """Records another node forwarded to this one (``RemoteEnqueueHandler``), grouped by partition: each group
        names its queue, partition and the epoch the sender believes current, and its records are already in the
        stored form (key length u16 | key | payload). ``ownership`` (if set) refuses partitions this node does not
        own (NotOwner) or epochs that are not current (StaleEpoch). The future resolves once all are durable."""
        return self._store_records(batches, check=True)

    def accept_transfer(self, batches: Sequence[Any]) -> asyncio.Future[None]:
        """Records a partition's previous owner hands over before this node takes the partition
        (``TransferPartition``): stored like forwarded ones, but without the ownership check, and at the offsets
        and with the delivery counts they had (see ``_store_records``)."""
        return self._store_records(batches, check=False)

    def _store_records(self, batches: Sequence[Any], check: bool) -> asyncio.Future[None]:
        # Every group is checked before any is stored: a refusal stores nothing (the sender retries all of it).
        targets = []
        for batch in batches:
            if check and self.ownership is not None:
                self.ownership.check(batch.queue, batch.partition, batch.epoch)
            try:
                queue = self.queue(batch.queue)
            except QueueUndefined:
                raise NotOwner(f"queue {batch.queue!r} is not known here yet") from None
            targets.append((queue, queue.partition(batch.partition), batch.records))
        counts: dict[PartitionLog, int] = {}
        for queue, part, records in targets:
            if records:
                try:
                    largest = max(map(payload_size, records))
                except ValueError:
                    raise BadQueueName("malformed forwarded record") from None
                queue.check_payload(largest)
                counts[part] = counts.get(part, 0) + len(records)
        for batch in batches:
            offsets = getattr(batch, "offsets", ())
            if getattr(batch, "next_offset", 0) >= MAX_OFFSET or offsets and (
                    len(offsets) != len(batch.records) or len(batch.deliveries) not in (0, len(offsets))
                    or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= MAX_OFFSET - 1
                    or batch.deliveries and max(batch.deliveries) > MAX_DELIVERIES_KEPT):
                raise BadQueueName("malformed transfer: offsets (ascending, below 2^63) and delivery counts (at "
                                   "most 254) must match the records")
        for part, count in counts.items():
            part.check_room(count)
        flush: asyncio.Future[None] | None = None
        waits: list[asyncio.Future[None]] = []
        for (queue, part, records), batch in zip(targets, batches):
            offsets = getattr(batch, "offsets", ())
            if getattr(batch, "next_offset", 0) > part.next_offset:
                part.advance_to(batch.next_offset)  # a transfer's last word: continue after the sender's offsets
            if offsets:
                flush = self._append_moved(part, records, offsets, batch.deliveries)
            elif records:
                flush = part.enqueue_many(records if type(records) is list else list(records))
                if part.replicated:
                    waits.append(self._committed(part, flush))
        if waits:
            return _all_of(self._loop, waits)
        if flush is None:
            flush = self._loop.create_future()
            flush.set_result(None)
        return flush

    @staticmethod
    def _append_moved(part: PartitionLog, records: Sequence[bytes], offsets: Sequence[int],
                      deliveries: bytes) -> asyncio.Future[None]:
        """Store messages moved from another node's log: at their offsets, in runs of consecutive ones, when they
        lie at or past this log's high-water mark (the usual case: this node continues the partition); otherwise
        (this node stored the partition before, under offsets of its own) after its own, in order. Delivery counts
        are kept either way."""
        records = records if type(records) is list else list(records)
        deliveries = deliveries or bytes(len(records))
        if offsets[0] < part.next_offset:
            flush = part.append_at(part.next_offset, records, deliveries)
        else:
            flush = None
            start = 0
            for i in range(1, len(offsets) + 1):
                if i == len(offsets) or offsets[i] != offsets[i - 1] + 1:
                    flush = part.append_at(offsets[start], records[start:i], deliveries[start:i])
                    start = i
        assert flush is not None
        return flush

    # -- consumers --------------------------------------------------------------------------------------

    def subscribe(self, consumer: Consumer, queue_name: str, at_most_once: bool = False) -> None:
        """Make ``consumer`` a competing consumer of ``queue_name`` (on a cluster, of a queue new to the cluster:
        once it is defined)."""
        try:
            queue = self.queue(queue_name)
        except QueueUndefined:
            def fail(error: BaseException) -> None:
                log.error("subscription to %s not served: %s", queue_name, error)
            self._when_defined(queue_name, lambda: self.subscribe(consumer, queue_name, at_most_once), fail)
            return
        state = self._consumers.get(id(consumer))
        if state is None:
            state = self._consumers[id(consumer)] = _ConsumerState(consumer)
        if queue_name not in state.queues:
            state.queues.add(queue_name)
            queue.consumers.append(state)
        if at_most_once:
            state.at_most_once.add(queue_name)
        else:
            state.at_most_once.discard(queue_name)
        self._schedule_dispatch(queue)
        if not getattr(consumer, "remote", False):
            self._consumers_changed((queue_name,))

    def unsubscribe(self, consumer: Consumer, queue_name: str) -> None:
        """Stop delivering ``queue_name`` to ``consumer``; its unacknowledged messages of that queue go back."""
        orphans = self._orphans.get(queue_name)
        if orphans is not None and orphans.pop(id(consumer), None) is not None and not orphans:
            del self._orphans[queue_name]
        state = self._consumers.get(id(consumer))
        if state is None or queue_name not in state.queues:
            return
        state.queues.discard(queue_name)
        state.at_most_once.discard(queue_name)
        queue = self._queues[queue_name]
        queue.consumers.remove(state)
        # Another node's route stream giving up a queue returns what its node held: no consumer failed.
        self._requeue([d for d in state.inflight if d.queue is queue], counted=not getattr(consumer, "remote", False))
        if not state.queues:
            del self._consumers[id(consumer)]
        if not getattr(consumer, "remote", False):
            self._consumers_changed((queue_name,))

    def consumer_gone(self, consumer: Consumer) -> tuple[int, int]:
        """The consumer disconnected: its subscriptions end and its unacknowledged messages go back, counted as
        delivery attempts, except for another node's route stream (a stream that broke, or a node that went away,
        is the broker's failure, not a consumer's). Returns how many were requeued, and how many of the others
        went to the dead-letter queue instead (delivered ``max_deliveries`` times)."""
        if self._orphans:
            for name in [n for n, orphans in self._orphans.items() if id(consumer) in orphans]:
                self.unsubscribe(consumer, name)
        state = self._consumers.pop(id(consumer), None)
        if state is None:
            return 0, 0
        for name in state.queues:
            self._queues[name].consumers.remove(state)
        deliveries = list(state.inflight)
        dead = self._requeue(deliveries, counted=not getattr(consumer, "remote", False))
        if not getattr(consumer, "remote", False):
            self._consumers_changed(state.queues)
        return len(deliveries) - dead, dead

    def subscriptions(self, consumer: Consumer) -> set[str]:
        state = self._consumers.get(id(consumer))
        return set(state.queues) if state else set()

    def inflight(self, consumer: Consumer) -> int:
        state = self._consumers.get(id(consumer))
        return len(state.inflight) if state else 0

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """The consumers acknowledged these deliveries: remove the messages. Returns how many were still theirs."""
        done = 0
        consumers = self._consumers
        # (partition, whether the acks are a local consumer's) -> the partition's queue and the offsets acked
        by_part: dict[tuple[Any, bool], tuple[Queue, list[int]]] = {}
        consumer: Any = None
        local = True
        inflight: dict[Delivery, None] = {}
        freed: list[_ConsumerState] = []
        for delivery in deliveries:
            if delivery.consumer is not consumer:  # a batch usually comes from one consumer: look it up once
                consumer = delivery.consumer
                local = not getattr(consumer, "remote", False)
                state = consumers.get(id(consumer))
                inflight = state.inflight if state is not None else {}
                if state is not None and (not freed or freed[-1] is not state):
                    freed.append(state)
            if inflight.pop(delivery, 0) is not None:
                continue  # requeued meanwhile (timeout, unsubscribe): the ack is too late to count
            entry = by_part.get((delivery.partition, local))
            if entry is None:
                entry = by_part[delivery.partition, local] = (delivery.queue, [])
            entry[1].append(delivery.message.offset)
        for (part, local), (queue, offsets) in by_part.items():
            acked = part.ack(offsets)
            if local:  # (a route stream's acks are its node's consumers', counted there)
                queue.acked += acked
            done += acked
        # The room freed in a consumer's window is for any of its queues (a window is shared by them): each is
        # dispatched, the one served longest ago first.
        queues = self._queues
        for state in freed:
            for name in state.queues:
                self._schedule_dispatch(queues[name])
        return done

    # -- dispatch ---------------------------------------------------------------------------------------

    def _on_readable(self, parts: list[PartitionLog]) -> None:
        for part in parts:
            queue = self._by_pid.get(part.pid)
            if queue is not None and queue.consumers:
                self._schedule_dispatch(queue)

    def _schedule_dispatch(self, queue: Queue) -> None:
        if not self._dispatch_scheduled:
            self._loop.call_soon(self._dispatch)
        self._dispatch_scheduled.add(queue)

    def _dispatch(self) -> None:
        queues, self._dispatch_scheduled = self._dispatch_scheduled, set()
        if len(queues) > 1:
            # Queues that share consumers compete for their windows' room: the one served longest ago goes first.
            queues = sorted(queues, key=_last_served)  # type: ignore[assignment]
        self._dispatch_round += 1
        for queue in queues:
            self._dispatch_queue(queue)

    def _dispatch_queue(self, queue: Queue) -> None:
        consumers = [s for s in queue.consumers if len(s.inflight) < s.consumer.window]
        if not consumers:
            return
        remote = [s for s in consumers if getattr(s.consumer, "remote", False)]
        if not remote:
            self._dispatch_to(queue, consumers, queue.sources)
            return
        # Other nodes' consumers get only this node's own partitions (a message is never routed twice); local
        # consumers get everything. Who goes first alternates, so neither side starves the other.
        local = [s for s in consumers if not getattr(s.consumer, "remote", False)]
        queue._remote_first = not queue._remote_first
        order = [(remote, queue.owned), (local, queue.sources)]
        for group, sources in order if queue._remote_first else order[::-1]:
            if group:
                self._dispatch_to(queue, group, sources)

    def _dispatch_to(self, queue: Queue, consumers: list[_ConsumerState], sources: list[Any]) -> None:
        capacity = sum(s.consumer.window - len(s.inflight) for s in consumers)
        taken = self._take(queue, capacity, sources)
        if not taken:
            return
        queue.last_served = self._dispatch_round
        # (Deliveries to another node's route stream are counted by that node, when its consumers get them.)
        local = not getattr(consumers[0].consumer, "remote", False)
        if local:
            queue.delivered += len(taken)
        redelivered = 0
        deadline = time.monotonic() + queue.config.ack_timeout
        if len(consumers) == 1:
            state = consumers[0]
            consumer, inflight = state.consumer, state.inflight
            deliveries = []
            for part, message in taken:
                if message.deliveries > 1 or message.returned:
                    redelivered += 1
                message.last_holder = None
                delivery = Delivery(queue, part, message, consumer, deadline)
                inflight[delivery] = None
                deliveries.append(delivery)
            batches = {id(state): (state, deliveries)}
        else:
            batches = {}
            strategy = queue.config.dispatch
            n = len(consumers)
            # The consumers are scanned in turn from where the last message left off: among equals (and for
            # round robin, among all with room) the next one after the last served wins.
            pos = queue._next_consumer % n
            for part, message in taken:
                # A message handed back (timeout, unsubscribe) goes to another consumer if one has room.
                previous, message.last_holder = message.last_holder, None
                if message.deliveries > 1 or message.returned:
                    redelivered += 1
                state = other = None
                fewest = fewest_other = 1 << 62
                at = at_other = 0
                if strategy == "random":
                    room = [s for s in consumers if len(s.inflight) < s.consumer.window]
                    if previous is not None and len(room) > 1:
                        room = [s for s in room if id(s.consumer) != previous] or room
                    if room:
                        other = self._rng.choice(room)
                        at_other = consumers.index(other)
                else:
                    for k in range(n):
                        i = (pos + k) % n
                        s = consumers[i]
                        held = len(s.inflight)
                        if held >= s.consumer.window:
                            continue
                        if previous is not None and id(s.consumer) == previous:
                            if held < fewest:
                                state, fewest, at = s, held, i
                        elif held < fewest_other:
                            other, fewest_other, at_other = s, held, i
                            if strategy == "round_robin":
                                break
                if other is not None:
                    state, at = other, at_other
                if state is None:
                    # Cannot happen (capacity was counted), but never overfill a window.
                    part.nack((message.offset,), counted=False)
                    continue
                pos = at + 1
                delivery = Delivery(queue, part, message, state.consumer, deadline)
                state.inflight[delivery] = None
                batches.setdefault(id(state), (state, []))[1].append(delivery)
            queue._next_consumer = pos
        if local:
            queue.redelivered += redelivered
        for state, deliveries in batches.values():
            if queue.name in state.at_most_once:
                # At most once: removed as it is sent.
                for d in deliveries:
                    del state.inflight[d]
                    d.partition.ack((d.message.offset,))
                queue.acked += len(deliveries)
            state.consumer.deliver(deliveries)
        if any(s.queues and len(s.inflight) < s.consumer.window for s in consumers):
            # Room left and maybe more on disk: continue on the next loop iteration.
            if any(p.ready for p in sources):
                self._schedule_dispatch(queue)

    def _take(self, queue: Queue, count: int, parts: list[Any]) -> list[tuple[PartitionLog, Message]]:
        """Up to ``count`` messages, shared among the ``parts`` that have some ready, round-robin: the next call
        starts after the last part served here. Dead-letters what was delivered too often."""
        taken: list[tuple[PartitionLog, Message]] = []
        n = len(parts)
        if not n:
            return taken
        start = queue._next_take % n
        ready = [i % n for i in range(start, start + n) if parts[i % n].ready]
        max_deliveries = 0 if queue.is_dlq else queue.config.max_deliveries
        last = start - 1
        while ready and len(taken) < count:
            share = -(-(count - len(taken)) // len(ready))  # ceil: one pass when every part has enough
            more = []
            for i in ready:
                want = min(share, count - len(taken))
                if want <= 0:
                    break
                part = parts[i]
                expired = part.expired
                got = part.take(want)
                if part.expired != expired:
                    self._expired(queue, part.expired - expired)
                last = i
                if len(got) == want and part.ready:
                    more.append(i)
                # (A proxy's messages are judged by their owner, which dead-letters them when they come back.)
                limit = max_deliveries if part.pid > 0 else 0
                for message in got:
                    if limit and message.deliveries > limit:
                        try:
                            self._dead_letter(queue, part, message, None)
                            continue
                        except ShoalError as exc:  # the DLQ is full or the disk is: deliver it once more instead
                            log.warning("cannot dead-letter message %d of %s/%d: %s", message.offset, queue.name,
                                        part.index, exc)
                    taken.append((part, message))
            ready = more
        queue._next_take = last + 1
        return taken

    def _expired(self, queue: Queue, count: int) -> None:
        """Messages of the queue expired when taken: logged at once, then at most every EXPIRY_LOG_INTERVAL with
        the count since (a queue whose messages all expire would otherwise log each batch)."""
        pending = self._expiries.get(queue.name)
        if pending is not None:
            pending[0] += count
            return
        log.info("queue %s: %d message(s) expired before delivery (ttl %s s)", queue.name, count, queue.config.ttl)
        self._expiries[queue.name] = [0]

        def report() -> None:
            left = self._expiries.pop(queue.name, [0])[0]
            if left:
                log.info("queue %s: %d more message(s) expired before delivery in the last %.0f s (ttl %s s)",
                         queue.name, left, EXPIRY_LOG_INTERVAL, queue.config.ttl)

        self._loop.call_later(EXPIRY_LOG_INTERVAL, report)

    def _dead_letter(self, queue: Queue, part: PartitionLog, message: Message, holder: Consumer | None) -> None:
        """Move a message to ``<name>.dlq``; the original is acked once the copy is durable. ``holder``: the
        consumer that last held it (None: found over the limit when taken, after a restart).
        QueueError (the message stays where it is, in flight) if the dead-letter queue refuses it."""
        key, payload = split_record(message.payload)
        # Through ``publish``: on a cluster the dead-letter queue's partition may be owned by another node.
        topic = QUEUE_PREFIX + queue.name + DLQ_SUFFIX + ("/" + key.decode() if key else "")
        flush = self.publish(topic, payload)
        last = consumer_name(holder) if holder is not None else "none since the node started"

        def settle(future: asyncio.Future[None]) -> None:
            if future.exception() is None:
                part.ack((message.offset,))
                queue.dead_lettered += 1
                log.warning("message %d of %s/%d moved to %s%s after %d delivery attempt(s) without an ack "
                            "(max_deliveries %d; last consumer: %s)", message.offset, queue.name, part.index,
                            queue.name, DLQ_SUFFIX, message.deliveries, queue.config.max_deliveries, last)
            else:  # the copy was not stored (a full disk): the message stays in flight here; try again later
                self._loop.call_later(DEAD_LETTER_RETRY, self._retry_dead_letter, queue, part, message, holder)

        flush.add_done_callback(settle)

    def _retry_dead_letter(self, queue: Queue, part: PartitionLog, message: Message, holder: Consumer | None) -> None:
        try:
            self._dead_letter(queue, part, message, holder)
        except ShoalError:
            self._loop.call_later(DEAD_LETTER_RETRY, self._retry_dead_letter, queue, part, message, holder)

    def _requeue(self, deliveries: list[Delivery], counted: bool = True) -> int:
        """Hand deliveries back to their partitions, or to the dead-letter queue once delivered too often.
        ``counted``: see ``hand_back``; an uncounted return never dead-letters. Returns how many went to the
        dead-letter queue."""
        dead = 0
        by_part: dict[int, tuple[PartitionLog, Queue, list[int]]] = {}
        by_consumer: dict[int, tuple[Consumer, list[Delivery]]] = {}
        for d in deliveries:
            if id(d.consumer) in self._consumers:
                by_consumer.setdefault(id(d.consumer), (d.consumer, []))[1].append(d)
        for consumer, taken_back in by_consumer.values():
            consumer.revoke(taken_back)
        for d in deliveries:
            state = self._consumers.get(id(d.consumer))
            if state is not None:
                state.inflight.pop(d, None)
            limit = d.queue.config.max_deliveries
            if counted and limit and d.message.deliveries >= limit and not d.queue.is_dlq and d.partition.pid > 0:
                try:
                    self._dead_letter(d.queue, d.partition, d.message, d.consumer)
                    dead += 1
                    continue
                except ShoalError as exc:  # the DLQ is full or the disk is: back to its queue instead
                    log.warning("cannot dead-letter message %d of %s/%d: %s", d.message.offset, d.queue.name,
                                d.partition.index, exc)
            if state is not None:
                d.message.last_holder = id(d.consumer)
            by_part.setdefault(d.partition.pid, (d.partition, d.queue, []))[2].append(d.message.offset)
        queues = set()
        for part, queue, offsets in by_part.values():
            part.nack(offsets, counted)
            queues.add(queue)
        for queue in queues:
            self._schedule_dispatch(queue)
        return dead

    # -- ack timeouts -----------------------------------------------------------------------------------

    def _arm_ack_timer(self) -> None:
        shortest = min((q.config.ack_timeout for q in self._queues.values()), default=self.defaults.ack_timeout)
        self._ack_timer = self._loop.call_later(max(min(shortest / 4, 1.0), 0.05), self._check_ack_timeouts)

    def _check_ack_timeouts(self) -> None:
        try:
            now = time.monotonic()
            # Not for other nodes' route streams: their consumers' deadlines are kept on their node, and a stream
            # that ends hands everything back.
            expired = [d for s in self._consumers.values() if not getattr(s.consumer, "remote", False)
                       for d in s.inflight if d.deadline <= now]
            if expired:
                dead = self._requeue(expired)
                log.info("%d delivery(ies) not acked in time: %d handed to other consumers, %d moved to the "
                         "dead-letter queue (delivered max_deliveries times)", len(expired), len(expired) - dead, dead)
        finally:
            self._arm_ack_timer()

    # -- administration -----------------------------------------------------------------------------------

    def _existing(self, name: str) -> Queue:
        """An existing queue (opened if it is stored or declared); UnknownQueue if there is none."""
        queue = self._queues.get(name)
        if queue is not None:
            return queue
        if not self.known(name):
            raise UnknownQueue(f"no queue named {name!r}")
        try:
            return self.queue(name)
        except QueueUndefined:
            raise UnknownQueue(f"no queue named {name!r} in the cluster") from None

    async def purge(self, name: str) -> int:
        """Remove every ready message of the queue stored on this node (on a cluster: of the partitions it
        writes; a follower's replicas have none ready, and follow their leader's purge). Messages in flight to
        consumers stay. Done once the removal is durable; returns how many were removed."""
        queue = self._existing(name)
        removed = 0
        for part in queue.partitions:
            while part.ready:
                taken = part.take(ADMIN_BATCH)
                if not taken:
                    break
                part.ack([m.offset for m in taken])
                removed += len(taken)
                await asyncio.sleep(0)  # (publishers and consumers go on meanwhile)
        queue.purged += removed
        await self.store.flush()
        return removed

    async def redrive(self, name: str, limit: int | None = None) -> int:
        """Move the ready messages of a dead-letter queue (``<queue>.dlq``) back to its queue, each on the topic it
        was published on, in order; one is removed from here once its copy is durable there. At most ``limit``
        (None: all). Returns how many moved. QueueError if the target refuses them (what was not moved stays)."""
        if not name.endswith(DLQ_SUFFIX):
            raise QueueError(f"{name!r} is not a dead-letter queue (<queue>{DLQ_SUFFIX}): only those are redriven")
        dlq = self._existing(name)
        target = name[:-len(DLQ_SUFFIX)]
        self._existing(target)
        moved = 0
        for part in dlq.partitions:
            while part.ready and (limit is None or moved < limit):
                taken = part.take(ADMIN_BATCH if limit is None else min(ADMIN_BATCH, limit - moved))
                if not taken:
                    break
                runs: list[tuple[str, list[bytes]]] = []
                for message in taken:
                    key, payload = split_record(message.payload)
                    topic = QUEUE_PREFIX + target + ("/" + key.decode() if key else "")
                    if runs and runs[-1][0] == topic:
                        runs[-1][1].append(payload)
                    else:
                        runs.append((topic, [payload]))
                offsets = [m.offset for m in taken]
                try:
                    await _all_of(self._loop, [self.publish_many(topic, payloads) for topic, payloads in runs])
                except ShoalError as exc:
                    part.nack(offsets, counted=False)
                    raise QueueError(f"redrive of {name} stopped after {moved} message(s): {exc}") from None
                except BaseException:
                    part.nack(offsets, counted=False)
                    raise
                part.ack(offsets)
                moved += len(taken)
        dlq.redriven += moved
        await self.store.flush()
        return moved

    async def delete(self, name: str) -> int:
        """Delete the queue here: its messages (ready or not), its partitions and its definition in the data
        directory. QueueError if it has consumers on this node (they must unsubscribe first). Returns how many
        messages went with it. (On a cluster the caller removes its etcd definition first.)"""
        queue = self._existing(name)
        local = [s for s in queue.consumers if not getattr(s.consumer, "remote", False)]
        if local:
            raise QueueInUse(f"queue {name!r} has {len(local)} consumer(s) on this node: they must unsubscribe "
                             "before it is deleted")
        for state in list(queue.consumers):  # other nodes' route streams: they learn of it from the definition
            self.unsubscribe(state.consumer, name)
        removed = 0
        for _ in range(100):  # publishes may keep arriving: remove what came meanwhile too
            removed += await self.purge(name)
            if all(p.depth == 0 for p in queue.partitions):
                break
            await asyncio.sleep(0.01)
        else:
            raise QueueInUse(f"queue {name!r} still holds messages being written or delivered; try again")
        queue.purged -= removed  # (counted as deleted, not purged)
        self._forget(queue)
        self.store.drop_queue(name)
        await self.store.flush()
        return removed

    def _forget(self, queue: Queue) -> None:
        """Take an open queue out of the manager's tables (its partitions stay in the store)."""
        del self._queues[queue.name]
        self._dispatch_scheduled.discard(queue)
        for part in queue.partitions:
            self._by_pid.pop(part.pid, None)
        self._topics.clear()

    def drop(self, name: str) -> dict[int, int]:
        """On a cluster, the queue was deleted (its definition is gone from etcd): forget it here at once, whatever
        this node holds of it (ready, in flight, a follower's replicas, messages on their way to another node).
        Every partition is cut to nothing and dropped from the store with the next commit (``store.flush`` to wait
        for it); a late ack of a message in flight counts for nothing. A consumer connected here that is still
        subscribed (one that subscribed as the delete began) keeps its subscription: it is given the queue again if
        the queue is created anew. Returns how many messages went, per partition."""
        queue = self._queues.get(name)
        removed: dict[int, int] = {}
        if queue is None:  # (stored, never opened here: its partitions are still to be read to be cut)
            parts = [self.store.partition(q, i) for q, i in self.store.known_partitions() if q == name]
        else:
            parts = list(queue.partitions)
            local = False
            for state in list(queue.consumers):
                consumer = state.consumer
                if not getattr(consumer, "remote", False):
                    self._orphans.setdefault(name, {})[id(consumer)] = (consumer, name in state.at_most_once)
                    local = True
                state.queues.discard(name)
                state.at_most_once.discard(name)
                for delivery in [d for d in state.inflight if d.queue is queue]:
                    del state.inflight[delivery]
                if not state.queues and not state.inflight:
                    del self._consumers[id(consumer)]
            self._forget(queue)
            if local:
                self._consumers_changed((name,))
        for part in parts:
            removed[part.index] = part.truncate(0)
        self.store.drop_queue(name)
        return removed

    def close(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        self.store.on_readable = None


def _last_served(queue: Queue) -> int:
    return queue.last_served


def consumer_name(consumer: Consumer) -> str:
    """How logs name a consumer (its MQTT client id, or the node a route stream comes from)."""
    return str(getattr(consumer, "name", None) or type(consumer).__name__)


def _all_of(loop: asyncio.AbstractEventLoop, futures: list[asyncio.Future[None]]) -> asyncio.Future[None]:
    """A future that resolves once all of ``futures`` have, or fails with the first of them to fail."""
    outer: asyncio.Future[None] = loop.create_future()
    left = len(futures)

    def settle(future: asyncio.Future[None]) -> None:
        nonlocal left
        if outer.done():
            return
        if future.cancelled():
            outer.cancel()
            return
        if future.exception() is not None:
            outer.set_exception(future.exception())  # type: ignore[arg-type]
            outer.exception()  # retrieved: whoever awaits it still sees it; a QoS 0 publisher never does
            return
        left -= 1
        if not left:
            outer.set_result(None)

    for future in futures:
        future.add_done_callback(settle)
    if not futures:
        outer.set_result(None)
    return outer
