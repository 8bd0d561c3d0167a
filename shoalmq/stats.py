"""A node's counters: plain integers the hot paths add to once per batch, read by ``/metrics`` and ``$SYS``.

Nothing here imports prometheus-client: a counter is an int attribute (an add costs ~30 ns; a prometheus-client
``Counter.inc()`` ~0.7 µs, a labelled child looked up per call ~2.4 µs), and the collector
(``shoalmq.ops.metrics``) reads them when scraped. Queue and partition counts live with the queue
(``Queue``, ``PartitionLog``); these are the front end's (the cluster's are in ``shoalmq.cluster.stats``).
"""

from __future__ import annotations

import bisect
import collections
import time


class Histogram:
    """Cumulative-bucket histogram as Prometheus exposes it: ``observe`` costs one bisect."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs, ending with +Inf."""
        out, total = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


#: Seconds a commit (write and sync) takes.
COMMIT_SECONDS_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Messages a commit writes.
COMMIT_MESSAGES_BOUNDS = (1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)


class FrontEnd:
    """What the MQTT front end counts."""

    def __init__(self) -> None:
        self.started = time.time()
        #: Connections accepted (TCP or TLS), ever.
        self.connections = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        #: PUBLISH packets received from clients (queue and ordinary topics), and delivered to them.
        self.publishes_received = 0
        self.publishes_sent = 0
        #: (queue, reason) -> queue publishes refused (not stored, not acknowledged). Reasons: ``acl``,
        #: ``not_created``, ``too_large``, ``full``, ``storage``, ``bad_topic``, ``other``.
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()
        #: CONNECTs refused: ``bad_credentials`` (0x04) or ``not_authorized`` (0x05).
        self.connects_refused: collections.Counter[str] = collections.Counter()


FRONT_END = FrontEnd()
