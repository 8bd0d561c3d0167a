"""The load report: what each node holds, in ``/<cluster>/load/<node>``, for ``broker cluster status``: the depth of
every partition it owns (or leads), of those it stores without owning them (messages on their way to the owner, or
waiting on a node that came back; not the replicas it follows), and the gRPC stream messages it sent (``stats``).

The key is not on the node's lease: when the node dies (or stops with messages left on its disk) its last report
stays, so that ``broker cluster status`` can say which messages wait on a node that is down (those of partitions
with one replica: nobody else has them). A node that leaves writes a last report of what it still stores; its next
start overwrites it."""

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
        if load == self._last:
            return
        await self._write(load)

    async def final(self) -> None:
        """The report of a node that is leaving: what stays on its disk (every partition it stores is "not owned"
        by now). Best effort: etcd may be out of reach as the node stops."""
        load = self.load()
        load["stopped"] = int(time.time())
        await self._write(load)

    async def _write(self, load: dict[str, Any]) -> None:
        value = json.dumps({**load, "updated": int(time.time())}, sort_keys=True).encode()
        await self.etcd.call(self.etcd.put_sync, self.key, value)
        self._last = load
