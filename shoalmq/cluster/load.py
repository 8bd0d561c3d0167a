"""The load report: what each node holds, in ``/<cluster>/load/<node>`` (on its lease), for ``broker cluster
status``: the depth of every partition it owns (or leads), of those it stores without owning them (messages on their
way to the owner, or waiting on a node that came back; not the replicas it follows), and the gRPC stream messages
it sent (``stats``)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from shoalmq.cluster import stats
from shoalmq.cluster.etcd import Etcd
from shoalmq.cluster.membership import Membership
from shoalmq.cluster.view import ClusterView

if TYPE_CHECKING:
    from shoalmq.queue.manager import QueueManager

#: Seconds between updates of this node's key (only written when it changed).
LOAD_INTERVAL = 2.0


class LoadReport:
    def __init__(self, etcd: Etcd, membership: Membership, view: ClusterView, manager: QueueManager) -> None:
        self.etcd = etcd
        self.membership = membership
        self.view = view
        self.manager = manager
        self.key = f"/{view.cluster}/load/{view.node_id}".encode()
        self._next = 0.0
        self._last: dict[str, Any] | None = None
        self._last_lease = 0

    def load(self) -> dict[str, Any]:
        """Per queue, the depth of each partition this node owns, and of each it stores but does not own."""
        owned: dict[str, dict[str, int]] = {}
        stored: dict[str, dict[str, int]] = {}
        mine, records = self.view.mine, self.view.records
        for name, depths in self.manager.depths().items():
            for index, depth in enumerate(depths):
                if (name, index) in mine:
                    owned.setdefault(name, {})[str(index)] = depth
                elif depth and (name, index) not in records:  # (a replica followed here is not on its way)
                    stored.setdefault(name, {})[str(index)] = depth
        return {"owned": owned, "stored_not_owned": stored, "grpc_stream_messages": stats.snapshot()}

    async def report(self) -> None:
        """Write the report if it changed (at most every ``LOAD_INTERVAL``)."""
        now = time.monotonic()
        if now < self._next or not self.membership.lease_valid():
            return
        self._next = now + LOAD_INTERVAL
        load = self.load()
        if load == self._last and self._last_lease == self.membership.lease:
            return
        value = json.dumps({**load, "updated": int(time.time())}, sort_keys=True).encode()
        await self.etcd.call(self.etcd.put_sync, self.key, value, self.membership.lease)
        self._last, self._last_lease = load, self.membership.lease
