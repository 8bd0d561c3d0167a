"""Which nodes hold which partition: its leader (the owner) and its followers.

An assigner is a pure function of the live nodes, so every node computes the same answer from the same view;
the owner then records its ownership in etcd (``/<cluster>/partitions/<queue>/<p>``), which is what other nodes
and ``etcdctl`` read.

With replication each partition has ``R`` replicas: the leader (the owner, the one node that takes its writes)
first, then ``R - 1`` followers. ``R`` is the replication factor capped at the number of live nodes, so a partition
always has ``min(factor, N)`` distinct replicas. The owner does not depend on the factor: for every assigner,
``owner(q, p, nodes) == replicas(q, p, nodes, factor)[0]`` and ``assign(q, P, nodes)[p] == place(q, P, nodes,
factor)[p][0]`` for any factor, so changing a queue's replication factor never moves its leaders.

Two assigners, chosen by name (``assigner_named``, ``ASSIGNERS``):

- ``hash`` (``HashPartitionAssigner``): a fixed rotation over the sorted nodes; simple, perfectly balanced, and it
  moves most partitions whenever the membership changes;
- ``rendezvous`` (``RendezvousPartitionAssigner``): highest-random-weight hashing with bounded load; a membership
  change moves about ``1/N`` of the replicas, and no node holds more than 1.25x its share.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from shoalmq._native import fnv1a_32
from shoalmq.errors import ConfigError


class PartitionAssigner(Protocol):
    """Decides the replicas of a queue's partitions (leader first) among the live nodes.

    ``nodes`` are distinct node ids, in any order (the answer never depends on it). Every method raises ValueError
    when ``nodes`` is empty. ``partitions``, where it is optional, is the queue's partition count: an assigner
    whose answer for one partition depends on the others (``RendezvousPartitionAssigner``'s bounded load) needs it
    to agree with ``assign``/``place``; without it, it answers for the partition alone (see each assigner).
    """

    def owner(self, queue: str, partition: int, nodes: Sequence[str], *, partitions: int | None = None) -> str:
        """The node that owns (leads) ``partition`` of ``queue`` when ``nodes`` are live (ValueError if none is)."""

    def assign(self, queue: str, partitions: int, nodes: Sequence[str]) -> list[str]:
        """The owner (leader) of each of the queue's partitions."""

    def replicas(self, queue: str, partition: int, nodes: Sequence[str], factor: int, *,
                 partitions: int | None = None) -> list[str]:
        """The ``min(factor, len(nodes))`` distinct nodes holding ``partition`` of ``queue``: leader, then followers.

        ValueError if ``nodes`` is empty or has duplicates, or ``factor`` < 1."""

    def place(self, queue: str, partitions: int, nodes: Sequence[str], factor: int) -> list[list[str]]:
        """``replicas`` of every partition of the queue, in partition order (one call for the whole queue)."""


def _check(nodes: Sequence[str], factor: int) -> list[str]:
    """The nodes sorted by id, after checking them and the factor."""
    if not nodes:
        raise ValueError("no live node to own a partition")
    if factor < 1:
        raise ValueError(f"replication factor must be at least 1, got {factor}")
    ordered = sorted(nodes)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"duplicate node ids in {list(nodes)!r}")
    return ordered


def _check_partition(partition: int, partitions: int | None) -> None:
    if partitions is not None and not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} out of range for {partitions} partitions")


class HashPartitionAssigner:
    """Partition p of queue q is led by the live nodes sorted by id at index ``(p + fnv1a(q)) mod N``; its
    followers are the next ``R - 1`` nodes in the same sorted order, wrapping: replica k (k = 0 the leader) is at
    index ``(p + fnv1a(q) + k) mod N``.

    The queue's hash offsets the start, so the partition 0 of every queue does not land on the same node. Leaders
    and replicas are spread evenly (each node leads ``P/N`` partitions and holds ``P*R/N`` replicas, to within
    one). Adding or removing a node moves most partitions (``RendezvousPartitionAssigner`` moves few). Nothing
    depends on the partition count: ``partitions`` is only range-checked.
    """

    def owner(self, queue: str, partition: int, nodes: Sequence[str], *, partitions: int | None = None) -> str:
        if not nodes:
            raise ValueError("no live node to own a partition")
        _check_partition(partition, partitions)
        ordered = sorted(nodes)
        return ordered[(partition + fnv1a_32(queue.encode())) % len(ordered)]

    def assign(self, queue: str, partitions: int, nodes: Sequence[str]) -> list[str]:
        if not nodes:
            raise ValueError("no live node to own a partition")
        ordered = sorted(nodes)
        offset = fnv1a_32(queue.encode())
        return [ordered[(p + offset) % len(ordered)] for p in range(partitions)]

    def replicas(self, queue: str, partition: int, nodes: Sequence[str], factor: int, *,
                 partitions: int | None = None) -> list[str]:
        ordered = _check(nodes, factor)
        _check_partition(partition, partitions)
        n = len(ordered)
        start = partition + fnv1a_32(queue.encode())
        return [ordered[(start + k) % n] for k in range(min(factor, n))]

    def place(self, queue: str, partitions: int, nodes: Sequence[str], factor: int) -> list[list[str]]:
        ordered = _check(nodes, factor)
        if partitions < 0:
            raise ValueError(f"partitions must not be negative, got {partitions}")
        n = len(ordered)
        offset = fnv1a_32(queue.encode())
        r = min(factor, n)
        return [[ordered[(p + offset + k) % n] for k in range(r)] for p in range(partitions)]


# --- rendezvous hashing ----------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / golden ratio, odd)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

#: The bounded-load constant ``c``: a node holds at most ``ceil(c * P * R / N)`` of a queue's ``P * R`` replicas
#: and leads at most ``ceil(c * P / N)`` of its ``P`` partitions, i.e. at most 25% more than its fair share. Lower
#: spreads load more evenly but moves more partitions when nodes come and go (Mirrokni et al., "Consistent Hashing
#: with Bounded Loads", 2018: the movement grows like ``1/(c-1)^2``); 1.25 is the usual compromise. Kept as a
#: fraction so the bounds are exact integer arithmetic on every machine.
BOUND_NUMERATOR, BOUND_DENOMINATOR = 5, 4


def _bound(items: int, nodes: int) -> int:
    """``ceil(c * items / nodes)`` with c = 5/4, exactly."""
    return -(-BOUND_NUMERATOR * items // (BOUND_DENOMINATOR * nodes))


def _mix64(z: int) -> int:
    """splitmix64's finalizer: a bijective 64-bit mixer (every input bit changes about half the output bits)."""
    z ^= z >> 30
    z = (z * _MIX1) & _MASK64
    z ^= z >> 27
    z = (z * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _mix64_array(z: np.ndarray) -> np.ndarray:
    """``_mix64`` on an array of uint64 (numpy's uint64 arithmetic wraps modulo 2^64, as the masks do)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(_MIX1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=4096)
def _key64(kind: bytes, name: str) -> int:
    """A 64-bit key for a node or queue id: BLAKE2b (8-byte digest) of ``kind NUL utf-8(name)``, little-endian."""
    return int.from_bytes(hashlib.blake2b(kind + b"\0" + name.encode(), digest_size=8).digest(), "little")


def _partition_key(queue_key: int, partition: int) -> int:
    return _mix64((queue_key + (partition + 1) * _GAMMA) & _MASK64)


def rendezvous_score(queue: str, partition: int, node: str) -> int:
    """The weight of ``node`` for ``partition`` of ``queue`` (64 bits; higher ranks first).

    ``mix64(mix64(Q + (p + 1) * GAMMA) ^ K)`` where ``Q = blake2b8(b"queue\\0" + queue)``,
    ``K = blake2b8(b"node\\0" + node)`` (BLAKE2b with an 8-byte digest read little-endian), ``mix64`` is splitmix64's
    finalizer and ``GAMMA = 0x9E3779B97F4A7C15``, all modulo 2^64: the same on every machine and process, so any
    node, tool or language can reproduce a placement. Ties (never seen in practice) go to the smaller node id.
    """
    if partition < 0:
        raise ValueError(f"partition must not be negative, got {partition}")
    return _mix64(_partition_key(_key64(b"queue", queue), partition) ^ _key64(b"node", node))


def _rankings(queue: str, partitions: int, ordered: Sequence[str]) -> list[list[int]]:
    """For each partition, the indices into ``ordered`` (sorted ids) from the highest score to the lowest."""
    node_keys = np.array([_key64(b"node", node) for node in ordered], dtype=np.uint64)
    steps = np.arange(1, partitions + 1, dtype=np.uint64) * np.uint64(_GAMMA) + np.uint64(_key64(b"queue", queue))
    scores = _mix64_array(_mix64_array(steps)[:, None] ^ node_keys[None, :])
    # Ascending order of ~score is descending score; the stable sort breaks ties by index, i.e. by node id.
    return np.argsort(~scores, axis=1, kind="stable").tolist()


@functools.lru_cache(maxsize=256)
def _bounded_placement(queue: str, partitions: int, ordered: tuple[str, ...], r: int) -> tuple[tuple[str, ...], ...]:
    """Bounded-load rendezvous placement of all partitions (``ordered``: sorted distinct ids; ``r`` <= N).

    Two passes, each in partition order, each walking a partition's ranking from the top:

    1. leaders: the first node that leads fewer than ``lcap = ceil(c*P/N)`` partitions so far. Since
       ``N * lcap >= P`` a node with room is always found. The pass ignores ``r``, so leaders do not depend on the
       factor.
    2. followers: the first ``r - 1`` other nodes with room under ``cap = ceil(c*P*r/N)`` replicas, every
       leadership (including later ones) counted first. Near the end (fewer partitions left than ``cap``) greedy
       choices could leave the last partitions fewer than ``r - 1`` nodes with room, so a node with room is also
       skipped when taking it would leave the rest unplaceable, by this invariant kept from partition to
       partition: ``sum_i min(room_i, servable_i) >= left * (r - 1)``, where ``room_i`` is node i's follower room,
       ``servable_i`` the partitions left that it does not lead, ``left`` the partitions left. It holds at the
       start (``N * min(cap, P) >= P * r``), and a node that could follow every partition left
       (``load_i + left <= cap``) is never skipped, so every partition gets its ``r - 1`` followers and no node
       ever exceeds ``cap``.
    """
    n = len(ordered)
    order = _rankings(queue, partitions, ordered)
    lcap = _bound(partitions, n)
    led = [0] * n
    leaders: list[int] = []
    for ranking in order:
        for i in ranking:
            if led[i] < lcap:
                break
        else:  # pragma: no cover - N * lcap >= P leaves room for every partition
            raise AssertionError("no node has room for a leadership")
        led[i] += 1
        leaders.append(i)
    if r == 1:
        return tuple((ordered[i],) for i in leaders)

    cap = _bound(partitions * r, n)
    load = [0] * n  # replicas (leaderships and followers) in the partitions already placed
    room = [cap - count for count in led]  # follower slots left: every leadership, even a later one, is reserved
    leads_left = led[:]  # leaderships in the partitions not yet placed (the current one included)
    placement: list[tuple[str, ...]] = []
    for p, ranking in enumerate(order):
        leader = leaders[p]
        picks = [leader]
        left = partitions - p
        if r == n:  # every node holds every partition (cap >= P): the followers are the rest, by rank
            picks.extend(i for i in ranking if i != leader)
        elif left > cap:  # no node can be short of room yet: the invariant's slack is >= c*P*r - P*r
            for i in ranking:
                if i != leader and room[i] > 0:
                    picks.append(i)
                    if len(picks) == r:
                        break
        else:
            # Taking a node that could not follow every partition left costs the invariant one; the budget is
            # what it can afford, after the nodes that could (they lose one whether taken or not).
            critical = [load[i] + left <= cap for i in range(n)]
            budget = (sum(min(room[i], left - leads_left[i]) for i in range(n)) - left * (r - 1) + (r - 1)
                      - sum(critical) + critical[leader])
            for i in ranking:
                if i == leader:
                    continue
                if critical[i]:
                    picks.append(i)
                elif room[i] > 0 and budget > 0:
                    budget -= 1
                    picks.append(i)
                else:
                    continue
                if len(picks) == r:
                    break
        if len(picks) != r:  # pragma: no cover - excluded by the invariant
            raise AssertionError(f"partition {p} found {len(picks) - 1} followers of {r - 1}")
        load[leader] += 1
        leads_left[leader] -= 1
        for i in picks[1:]:
            load[i] += 1
            room[i] -= 1
        placement.append(tuple(ordered[i] for i in picks))
    return tuple(placement)


class RendezvousPartitionAssigner:
    """Rendezvous (highest-random-weight) hashing with bounded load: few partitions move when nodes change.

    Each node has a pseudo-random weight for each partition (``rendezvous_score``: a 64-bit hash of queue,
    partition and node, the same on every machine); a partition's nodes, ranked by weight, are its preferences.
    Without bounds the top ``R`` would be the replicas, and a joining or leaving node would move only the
    partitions it enters or leaves (``~R/N`` of them), but with few partitions per node the counts vary a lot.
    So ``place`` (and ``assign``) bound the load over the queue (``c`` = 1.25, ``BOUND_NUMERATOR /
    BOUND_DENOMINATOR``): in partition order, a partition's leader is its highest-ranked node that leads fewer
    than ``ceil(c * P / N)`` partitions, and its followers the next highest-ranked nodes that hold fewer than
    ``ceil(c * P * R / N)`` replicas (a full node is skipped; ``_bounded_placement`` has the details, including
    why no partition is ever left short). ``R = min(factor, N)``. Leaders do not depend on the factor.

    The answer is a pure function of ``(queue, partitions, nodes, factor)``, independent of the order of
    ``nodes``. Because of the bounds a partition's replicas depend on the other partitions, hence on the
    partition count: ``replicas``/``owner`` with ``partitions=P`` answer exactly ``place(q, P, ...)[p]`` /
    ``assign(q, P, ...)[p]``; with ``partitions=None`` (the default) they answer plain, unbounded rendezvous for
    that partition alone (its top ``R`` nodes by weight), which may differ. Placements are cached (a small LRU
    keyed by all four inputs), so asking for each partition in turn costs one ``place``.
    """

    def owner(self, queue: str, partition: int, nodes: Sequence[str], *, partitions: int | None = None) -> str:
        return self.replicas(queue, partition, nodes, 1, partitions=partitions)[0]

    def assign(self, queue: str, partitions: int, nodes: Sequence[str]) -> list[str]:
        return [replicas[0] for replicas in self.place(queue, partitions, nodes, 1)]

    def replicas(self, queue: str, partition: int, nodes: Sequence[str], factor: int, *,
                 partitions: int | None = None) -> list[str]:
        ordered = _check(nodes, factor)
        if partition < 0:
            raise ValueError(f"partition must not be negative, got {partition}")
        _check_partition(partition, partitions)
        r = min(factor, len(ordered))
        if partitions is not None:
            return list(_bounded_placement(queue, partitions, tuple(ordered), r)[partition])
        key = _partition_key(_key64(b"queue", queue), partition)
        scores = {node: _mix64(key ^ _key64(b"node", node)) for node in ordered}
        return sorted(ordered, key=lambda node: -scores[node])[:r]  # stable: ties to the smaller id

    def place(self, queue: str, partitions: int, nodes: Sequence[str], factor: int) -> list[list[str]]:
        ordered = _check(nodes, factor)
        if partitions < 0:
            raise ValueError(f"partitions must not be negative, got {partitions}")
        if partitions == 0:
            return []
        return [list(replicas) for replicas in
                _bounded_placement(queue, partitions, tuple(ordered), min(factor, len(ordered)))]


#: The assigners by the name a configuration gives them.
ASSIGNERS: dict[str, Callable[[], PartitionAssigner]] = {
    "hash": HashPartitionAssigner,
    "rendezvous": RendezvousPartitionAssigner,
}


def assigner_named(name: str) -> PartitionAssigner:
    """A new assigner of the kind ``name`` (a key of ``ASSIGNERS``); ConfigError if there is none."""
    try:
        factory = ASSIGNERS[name]
    except KeyError:
        raise ConfigError(f"unknown partition assigner {name!r} (known: {', '.join(sorted(ASSIGNERS))})") from None
    return factory()
