"""The gRPC service a clustered node serves: forwarded publishes, route streams, handoffs and replication."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from shoalmq.cluster.routing import serve_route_stream
from shoalmq.cluster.transport import LinkServicer, answer_batches, peer_identity
from shoalmq.proto import broker_pb2

if TYPE_CHECKING:
    from shoalmq.cluster.coordinator import Coordinator
    from shoalmq.queue.manager import QueueManager


class NodeServicer(LinkServicer):
    def __init__(self, manager: QueueManager, coordinator: Coordinator) -> None:
        self.manager = manager
        self.coordinator = coordinator

    async def EnqueueRemote(self, request_iterator: AsyncIterator[broker_pb2.EnqueueBatch],  # noqa: N802
                            context: grpc.aio.ServicerContext) -> AsyncIterator[broker_pb2.EnqueueAck]:
        async for ack in answer_batches(request_iterator, self.manager.enqueue_remote):
            yield ack

    async def TransferPartition(self, request_iterator: AsyncIterator[broker_pb2.EnqueueBatch],  # noqa: N802
                                context: grpc.aio.ServicerContext) -> AsyncIterator[broker_pb2.EnqueueAck]:
        async for ack in answer_batches(request_iterator, self.manager.accept_transfer):
            yield ack

    async def RouteQueueMessage(self, request_iterator: AsyncIterator[broker_pb2.RouteRequest],  # noqa: N802
                                context: grpc.aio.ServicerContext) -> AsyncIterator[broker_pb2.RouteDeliveries]:
        async for message in serve_route_stream(self.manager, self.coordinator.view, request_iterator,
                                                context.peer()):
            yield message

    async def Replicate(self, request_iterator: AsyncIterator[broker_pb2.ReplicaRequest],  # noqa: N802
                        context: grpc.aio.ServicerContext) -> AsyncIterator[broker_pb2.ReplicaData]:
        async for message in self.coordinator.replicator.serve(request_iterator, context.peer(),
                                                               peer_identity(context)):
            yield message

    async def ProbeLeaders(self, request: broker_pb2.LeaderProbe,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> broker_pb2.LeaderProbe:
        return self.coordinator.replicator.probe(request)
