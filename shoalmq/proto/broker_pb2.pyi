from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LinkFrame(_message.Message):
    __slots__ = ("parts",)
    PARTS_FIELD_NUMBER: _ClassVar[int]
    parts: _containers.RepeatedCompositeFieldContainer[LinkPart]
    def __init__(self, parts: _Optional[_Iterable[_Union[LinkPart, _Mapping]]] = ...) -> None: ...

class LinkPart(_message.Message):
    __slots__ = ("channel", "method", "body", "end", "error")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    channel: int
    method: str
    body: bytes
    end: bool
    error: str
    def __init__(self, channel: _Optional[int] = ..., method: _Optional[str] = ..., body: _Optional[bytes] = ..., end: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class PartitionRecords(_message.Message):
    __slots__ = ("queue", "partition", "epoch", "records", "offsets", "deliveries", "next_offset")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    queue: str
    partition: int
    epoch: int
    records: bytes
    offsets: _containers.RepeatedScalarFieldContainer[int]
    deliveries: bytes
    next_offset: int
    def __init__(self, queue: _Optional[str] = ..., partition: _Optional[int] = ..., epoch: _Optional[int] = ..., records: _Optional[bytes] = ..., offsets: _Optional[_Iterable[int]] = ..., deliveries: _Optional[bytes] = ..., next_offset: _Optional[int] = ...) -> None: ...

class EnqueueBatch(_message.Message):
    __slots__ = ("batch_id", "partitions")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionRecords]
    def __init__(self, batch_id: _Optional[int] = ..., partitions: _Optional[_Iterable[_Union[PartitionRecords, _Mapping]]] = ...) -> None: ...

class EnqueueAck(_message.Message):
    __slots__ = ("batch_id", "status", "detail")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[EnqueueAck.Status]
        NOT_OWNER: _ClassVar[EnqueueAck.Status]
        STALE_EPOCH: _ClassVar[EnqueueAck.Status]
        REFUSED: _ClassVar[EnqueueAck.Status]
    OK: EnqueueAck.Status
    NOT_OWNER: EnqueueAck.Status
    STALE_EPOCH: EnqueueAck.Status
    REFUSED: EnqueueAck.Status
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    status: EnqueueAck.Status
    detail: str
    def __init__(self, batch_id: _Optional[int] = ..., status: _Optional[_Union[EnqueueAck.Status, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("queue", "credit", "acks", "nacks", "returns")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    NACKS_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    credit: int
    acks: _containers.RepeatedCompositeFieldContainer[PartitionOffsets]
    nacks: _containers.RepeatedCompositeFieldContainer[PartitionOffsets]
    returns: _containers.RepeatedCompositeFieldContainer[PartitionOffsets]
    def __init__(self, queue: _Optional[str] = ..., credit: _Optional[int] = ..., acks: _Optional[_Iterable[_Union[PartitionOffsets, _Mapping]]] = ..., nacks: _Optional[_Iterable[_Union[PartitionOffsets, _Mapping]]] = ..., returns: _Optional[_Iterable[_Union[PartitionOffsets, _Mapping]]] = ...) -> None: ...

class PartitionOffsets(_message.Message):
    __slots__ = ("partition", "epoch", "offsets")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    partition: int
    epoch: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, partition: _Optional[int] = ..., epoch: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class RouteDeliveries(_message.Message):
    __slots__ = ("queue", "partition", "epoch", "records", "offsets", "deliveries", "returned")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    queue: str
    partition: int
    epoch: int
    records: bytes
    offsets: _containers.RepeatedScalarFieldContainer[int]
    deliveries: bytes
    returned: bytes
    def __init__(self, queue: _Optional[str] = ..., partition: _Optional[int] = ..., epoch: _Optional[int] = ..., records: _Optional[bytes] = ..., offsets: _Optional[_Iterable[int]] = ..., deliveries: _Optional[bytes] = ..., returned: _Optional[bytes] = ...) -> None: ...

class ReplicaRequest(_message.Message):
    __slots__ = ("partitions", "node")
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    partitions: _containers.RepeatedCompositeFieldContainer[FollowerState]
    node: str
    def __init__(self, partitions: _Optional[_Iterable[_Union[FollowerState, _Mapping]]] = ..., node: _Optional[str] = ...) -> None: ...

class FollowerState(_message.Message):
    __slots__ = ("queue", "partition", "epoch", "subscribe", "last_epoch", "end_offset", "durable_offset")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    LAST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DURABLE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    queue: str
    partition: int
    epoch: int
    subscribe: bool
    last_epoch: int
    end_offset: int
    durable_offset: int
    def __init__(self, queue: _Optional[str] = ..., partition: _Optional[int] = ..., epoch: _Optional[int] = ..., subscribe: _Optional[bool] = ..., last_epoch: _Optional[int] = ..., end_offset: _Optional[int] = ..., durable_offset: _Optional[int] = ...) -> None: ...

class ReplicaData(_message.Message):
    __slots__ = ("partitions",)
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionData]
    def __init__(self, partitions: _Optional[_Iterable[_Union[PartitionData, _Mapping]]] = ...) -> None: ...

class PartitionData(_message.Message):
    __slots__ = ("queue", "partition", "epoch", "status", "has_history", "history", "records", "offsets", "end_offset", "commit_offset", "acks")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[PartitionData.Status]
        NOT_LEADER: _ClassVar[PartitionData.Status]
    OK: PartitionData.Status
    NOT_LEADER: PartitionData.Status
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HAS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMMIT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    partition: int
    epoch: int
    status: PartitionData.Status
    has_history: bool
    history: _containers.RepeatedScalarFieldContainer[int]
    records: bytes
    offsets: _containers.RepeatedScalarFieldContainer[int]
    end_offset: int
    commit_offset: int
    acks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, queue: _Optional[str] = ..., partition: _Optional[int] = ..., epoch: _Optional[int] = ..., status: _Optional[_Union[PartitionData.Status, str]] = ..., has_history: _Optional[bool] = ..., history: _Optional[_Iterable[int]] = ..., records: _Optional[bytes] = ..., offsets: _Optional[_Iterable[int]] = ..., end_offset: _Optional[int] = ..., commit_offset: _Optional[int] = ..., acks: _Optional[_Iterable[int]] = ...) -> None: ...

class LeaderProbe(_message.Message):
    __slots__ = ("partitions",)
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionProbe]
    def __init__(self, partitions: _Optional[_Iterable[_Union[PartitionProbe, _Mapping]]] = ...) -> None: ...

class PartitionProbe(_message.Message):
    __slots__ = ("queue", "partition", "leader", "epoch", "heard_ms")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARD_MS_FIELD_NUMBER: _ClassVar[int]
    queue: str
    partition: int
    leader: str
    epoch: int
    heard_ms: int
    def __init__(self, queue: _Optional[str] = ..., partition: _Optional[int] = ..., leader: _Optional[str] = ..., epoch: _Optional[int] = ..., heard_ms: _Optional[int] = ...) -> None: ...
