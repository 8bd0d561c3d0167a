# cython: language_level=3
"""MQTT 3.1.1 framing for the hot packets, in bulk: every frame of a socket read parsed in one call, acks and
deliveries encoded into one ``bytes`` each.

``decode`` walks the buffer with a pointer: a PUBLISH becomes a tuple of small ints, its topic (a ``str``) and its
payload (a ``bytes``), and nothing else is allocated per frame (a frame whose topic bytes equal the previous
PUBLISH's reuses that ``str`` object). The encoders size their output first and fill one ``bytes`` buffer.

The pure-Python twin is ``mqtt_codec_py.py``; ``mqtt_codec.pyi`` documents the interface. Both raise the same
exceptions, with the same messages, for the same input (tests/test_mqtt_codec.py). The PUBLISH checks are those
of ``shoalmq/broker/frames.py`` (same wording, same spec clauses), plus packet identifier 0.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_AsTuple, PyList_Check
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject_IsTrue
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp, memcpy

from ._errors import MalformedPacket, PacketTooLarge

__all__ = ["MAX_REMAINING_LENGTH", "MalformedPacket", "decode", "encode_acks", "encode_publishes", "encode_records"]

MAX_REMAINING_LENGTH = 268_435_455
cdef Py_ssize_t _MAX_REMAINING = 268_435_455

# The packet types the hot loops compare against, as C constants (shoalmq/_native/mqtt_packets.py is their home;
# tests/test_mqtt_codec.py checks these agree with it).
cdef enum:
    _PUBLISH = 3
    _PUBACK = 4
    _PUBREL = 6
    _PUBCOMP = 7

from .mqtt_packets import ACK_NAMES as _ACK_NAMES


cdef struct _Delivery:
    Py_ssize_t remaining   # remaining length of the frame
    long packet_id         # 0: QoS 0
    uint8_t first          # type and flags byte


cdef inline long long _int_arg(object value, str name, long long low, long long high) except? -1:
    # __index__ semantics, as operator.index in the twin: TypeError for float, str, None; ValueError out of range.
    cdef int overflow = 0
    cdef long long number = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or number < low or number > high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value!r}")
    return number


cdef inline Py_ssize_t _varint_size(Py_ssize_t remaining) noexcept nogil:
    if remaining < 128:
        return 1
    if remaining < 16384:
        return 2
    if remaining < 2097152:
        return 3
    return 4


cdef inline uint8_t* _put_varint(uint8_t* p, Py_ssize_t remaining) noexcept nogil:
    while remaining >= 128:
        p[0] = <uint8_t>((remaining & 0x7F) | 0x80)
        p += 1
        remaining >>= 7
    p[0] = <uint8_t>remaining
    return p + 1


cdef inline Py_ssize_t _fixed_header(const uint8_t* buf, Py_ssize_t pos, Py_ssize_t n,
                                     Py_ssize_t* remaining) except -2:
    """Offset of the frame's body, -1 if the fixed header is not all in the buffer yet."""
    cdef Py_ssize_t p = pos + 1, value = 0
    cdef int shift = 0
    cdef uint8_t byte
    while True:
        if p >= n:
            return -1
        byte = buf[p]
        p += 1
        value |= <Py_ssize_t>(byte & 0x7F) << shift
        if not byte & 0x80:
            remaining[0] = value
            return p
        shift += 7
        if shift == 28:
            raise MalformedPacket("remaining length longer than 4 bytes [MQTT-2.2.3]")


cdef inline Py_ssize_t _size_publish(_Delivery* meta, Py_ssize_t topic_len, Py_ssize_t payload_len, long packet_id,
                                     int dup) except -1:
    """Check a PUBLISH's topic length and size, fill in its ``meta`` and return the size of its frame."""
    if topic_len > 0xFFFF:
        raise ValueError(f"topic of {topic_len} bytes, longer than 65535 [MQTT-1.5.3]")
    cdef Py_ssize_t remaining = 2 + topic_len + (2 if packet_id else 0) + payload_len
    if remaining > _MAX_REMAINING:
        raise ValueError(f"PUBLISH of remaining length {remaining}, more than {_MAX_REMAINING} [MQTT-2.2.3]")
    meta.remaining = remaining
    meta.packet_id = packet_id
    meta.first = 0x30 | ((0x08 | 0x02) if dup else (0x02 if packet_id else 0))
    return 1 + _varint_size(remaining) + remaining


cdef inline uint8_t* _put_publish(uint8_t* p, const _Delivery* meta, const char* topic, Py_ssize_t topic_len,
                                  const char* key, Py_ssize_t key_len, const char* payload,
                                  Py_ssize_t payload_len) noexcept nogil:
    """Write one PUBLISH frame at ``p``: its topic is ``topic``, or ``topic/key`` if ``key_len``. Returns its end."""
    cdef Py_ssize_t full_len = topic_len + (1 + key_len if key_len else 0)
    p[0] = meta.first
    p = _put_varint(p + 1, meta.remaining)
    p[0] = <uint8_t>(full_len >> 8)
    p[1] = <uint8_t>(full_len & 0xFF)
    memcpy(p + 2, topic, topic_len)
    p += 2 + topic_len
    if key_len:
        p[0] = 0x2F  # '/'
        memcpy(p + 1, key, key_len)
        p += 1 + key_len
    if meta.packet_id:
        p[0] = <uint8_t>(meta.packet_id >> 8)
        p[1] = <uint8_t>(meta.packet_id & 0xFF)
        p += 2
    memcpy(p, payload, payload_len)
    return p + payload_len


def decode(data, max_packet_size):
    """Parse every complete frame of ``data``; ``(packets, consumed)``. See mqtt_codec.pyi."""
    if not PyBytes_CheckExact(data):
        raise TypeError(f"data must be bytes, not {type(data).__name__!r}")
    cdef Py_ssize_t max_size = _int_arg(max_packet_size, "max_packet_size", 0, 0x7FFFFFFFFFFFFFFF)
    cdef const uint8_t* buf = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos = 0, body, end, remaining = 0, topic_len, cursor
    cdef Py_ssize_t last_topic_len = -1
    cdef const uint8_t* last_topic = NULL
    cdef const uint8_t* topic_ptr
    cdef int kind, flags, qos, expected
    cdef long packet_id
    cdef object topic = None
    cdef list packets = []
    while pos < n:
        body = _fixed_header(buf, pos, n, &remaining)
        if body < 0:
            break
        if body - pos + remaining > max_size:
            raise PacketTooLarge(f"packet of {body - pos + remaining} bytes exceeds max_packet_size "
                                  f"{max_size}")
        kind = buf[pos] >> 4
        flags = buf[pos] & 0x0F
        if kind == 0 or kind == 15:
            raise MalformedPacket(f"reserved packet type {kind} [MQTT-2.2.1]")
        end = body + remaining
        if end > n:
            break
        if kind == _PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                raise MalformedPacket("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
            if qos == 0 and flags & 0x08:
                raise MalformedPacket("PUBLISH with QoS 0 and DUP set [MQTT-3.3.1-2]")
            if remaining < 2:
                raise MalformedPacket("PUBLISH topic: length field runs past the packet [MQTT-1.5.3]")
            topic_len = (<Py_ssize_t>buf[body] << 8) | buf[body + 1]
            topic_ptr = buf + body + 2
            cursor = body + 2 + topic_len
            if cursor > end:
                raise MalformedPacket(f"PUBLISH topic: {topic_len} bytes announced, packet too short [MQTT-1.5.3]")
            if topic_len != last_topic_len or memcmp(topic_ptr, last_topic, topic_len) != 0:
                try:
                    topic = PyUnicode_DecodeUTF8(<char*>topic_ptr, topic_len, NULL)
                except UnicodeDecodeError:
                    raise MalformedPacket("PUBLISH topic: not valid UTF-8 [MQTT-1.5.3-1]") from None
                # In valid UTF-8 these code points appear only as these single bytes.
                if memchr(topic_ptr, 0, topic_len) != NULL:
                    raise MalformedPacket("PUBLISH topic: contains U+0000 [MQTT-1.5.3-2]")
                if memchr(topic_ptr, 43, topic_len) != NULL or memchr(topic_ptr, 35, topic_len) != NULL:
                    raise MalformedPacket("PUBLISH topic: wildcard in a topic name [MQTT-3.3.2-2]")
                if topic_len == 0:
                    raise MalformedPacket("PUBLISH topic: empty [MQTT-4.7.3-1]")
                last_topic, last_topic_len = topic_ptr, topic_len
            if qos:
                if cursor + 2 > end:
                    raise MalformedPacket("PUBLISH without its packet identifier [MQTT-2.3.1]")
                packet_id = (<long>buf[cursor] << 8) | buf[cursor + 1]
                if packet_id == 0:
                    raise MalformedPacket("PUBLISH with packet identifier 0 [MQTT-2.3.1-1]")
                cursor += 2
            else:
                packet_id = 0
            packets.append((_PUBLISH, flags, topic, packet_id,
                            PyBytes_FromStringAndSize(<const char*>(buf + cursor), end - cursor)))
        elif _PUBACK <= kind <= _PUBCOMP:
            expected = 2 if kind == _PUBREL else 0
            if flags != expected:
                raise MalformedPacket(f"{_ACK_NAMES[kind]} with flags {flags:#06b}, expected {expected:#06b} "
                                      "[MQTT-2.2.2-1] [MQTT-2.2.2-2]")
            if remaining != 2:
                raise MalformedPacket(f"{_ACK_NAMES[kind]} with remaining length {remaining}, must be 2 "
                                      f"[MQTT-3.{kind}.1]")
            packets.append((kind, flags, (<long>buf[body] << 8) | buf[body + 1]))
        else:
            packets.append((kind, flags, PyBytes_FromStringAndSize(<const char*>(buf + body), remaining)))
        pos = end
    return packets, pos


def encode_acks(kind, packet_ids):
    """Concatenated 4-byte ack frames of type ``kind``, one per packet identifier. See mqtt_codec.pyi."""
    cdef long long k = _int_arg(kind, "kind", _PUBACK, _PUBCOMP)
    if not PyList_Check(packet_ids):
        raise TypeError(f"packet_ids must be a list, not {type(packet_ids).__name__!r}")
    # A snapshot: converting an id may run Python code (__index__), which could change the list under us.
    cdef tuple ids = PyList_AsTuple(packet_ids)
    cdef Py_ssize_t i, count = PyTuple_GET_SIZE(ids)
    cdef uint8_t first = <uint8_t>((k << 4) | (2 if k == _PUBREL else 0))
    cdef long long packet_id
    out = PyBytes_FromStringAndSize(NULL, 4 * count)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    for i in range(count):
        packet_id = _int_arg(<object>PyTuple_GET_ITEM(ids, i), "packet_id", 1, 0xFFFF)
        p[0] = first
        p[1] = 2
        p[2] = <uint8_t>(packet_id >> 8)
        p[3] = <uint8_t>(packet_id & 0xFF)
        p += 4
    return out


def encode_publishes(items):
    """Concatenated PUBLISH frames, QoS 0 or 1, one per ``(topic, payload, packet_id, dup)``. See mqtt_codec.pyi."""
    if not PyList_Check(items):
        raise TypeError(f"items must be a list, not {type(items).__name__!r}")
    # A snapshot holding every item (and so every topic and payload) alive: checking an item may run Python code
    # (__index__, __bool__), which could change the list between the sizing pass and the writing pass.
    cdef tuple frames = PyList_AsTuple(items)
    cdef Py_ssize_t i, count = PyTuple_GET_SIZE(frames), total = 0
    if count == 0:
        return b""
    cdef _Delivery* meta = <_Delivery*>malloc(count * sizeof(_Delivery))
    if meta == NULL:
        raise MemoryError()
    cdef object item, topic, payload
    cdef long packet_id
    cdef int dup
    cdef uint8_t* p
    try:
        for i in range(count):
            item = <object>PyTuple_GET_ITEM(frames, i)
            if not PyTuple_Check(item) or PyTuple_GET_SIZE(item) != 4:
                raise TypeError(f"items must be (topic, payload, packet_id, dup) tuples, not {item!r:.80}")
            topic = <object>PyTuple_GET_ITEM(item, 0)
            payload = <object>PyTuple_GET_ITEM(item, 1)
            if not PyBytes_CheckExact(topic):
                raise TypeError(f"topic must be bytes, not {type(topic).__name__!r}")
            if not PyBytes_CheckExact(payload):
                raise TypeError(f"payload must be bytes, not {type(payload).__name__!r}")
            packet_id = <long>_int_arg(<object>PyTuple_GET_ITEM(item, 2), "packet_id", 0, 0xFFFF)
            dup = PyObject_IsTrue(<object>PyTuple_GET_ITEM(item, 3))
            if dup and packet_id == 0:
                raise ValueError("a QoS 0 PUBLISH (packet_id 0) cannot have DUP set [MQTT-3.3.1-2]")
            total += _size_publish(&meta[i], PyBytes_GET_SIZE(topic), PyBytes_GET_SIZE(payload), packet_id, dup)
        out = PyBytes_FromStringAndSize(NULL, total)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        for i in range(count):
            item = <object>PyTuple_GET_ITEM(frames, i)
            topic = <object>PyTuple_GET_ITEM(item, 0)
            payload = <object>PyTuple_GET_ITEM(item, 1)
            p = _put_publish(p, &meta[i], PyBytes_AS_STRING(topic), PyBytes_GET_SIZE(topic), NULL, 0,
                             PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))
        return out
    finally:
        free(meta)


def encode_records(prefix, records, packet_ids, dups=None):
    """Concatenated PUBLISH frames of stored queue records (``key length u16 | key | payload``), each on ``prefix``
    or ``prefix/key``, with the packet identifiers of ``packet_ids``. See mqtt_codec.pyi."""
    if not PyBytes_CheckExact(prefix):
        raise TypeError(f"prefix must be bytes, not {type(prefix).__name__!r}")
    if not PyList_Check(records):
        raise TypeError(f"records must be a list, not {type(records).__name__!r}")
    if not PyList_Check(packet_ids):
        raise TypeError(f"packet_ids must be a list, not {type(packet_ids).__name__!r}")
    if dups is not None and not PyBytes_CheckExact(dups):
        raise TypeError(f"dups must be bytes or None, not {type(dups).__name__!r}")
    # Snapshots, for the same reason as in encode_publishes.
    cdef tuple recs = PyList_AsTuple(records)
    cdef tuple ids = PyList_AsTuple(packet_ids)
    cdef Py_ssize_t i, count = PyTuple_GET_SIZE(recs), total = 0, prefix_len = PyBytes_GET_SIZE(prefix)
    cdef Py_ssize_t record_len, key_len
    if PyTuple_GET_SIZE(ids) != count:
        raise ValueError(f"{count} records but {PyTuple_GET_SIZE(ids)} packet_ids")
    if dups is not None and PyBytes_GET_SIZE(dups) != count:
        raise ValueError(f"{count} records but {PyBytes_GET_SIZE(dups)} dups")
    if count == 0:
        return b""
    cdef const uint8_t* dup_flags = <const uint8_t*>PyBytes_AS_STRING(dups) if dups is not None else NULL
    cdef _Delivery* meta = <_Delivery*>malloc(count * sizeof(_Delivery))
    if meta == NULL:
        raise MemoryError()
    cdef object record
    cdef const uint8_t* r
    cdef long packet_id
    cdef int dup
    cdef uint8_t* p
    try:
        for i in range(count):
            record = <object>PyTuple_GET_ITEM(recs, i)
            if not PyBytes_CheckExact(record):
                raise TypeError(f"record must be bytes, not {type(record).__name__!r}")
            packet_id = <long>_int_arg(<object>PyTuple_GET_ITEM(ids, i), "packet_id", 0, 0xFFFF)
            dup = dup_flags != NULL and dup_flags[i] != 0
            if dup and packet_id == 0:
                raise ValueError("a QoS 0 PUBLISH (packet_id 0) cannot have DUP set [MQTT-3.3.1-2]")
            record_len = PyBytes_GET_SIZE(record)
            if record_len < 2:
                raise ValueError("record shorter than its key length")
            r = <const uint8_t*>PyBytes_AS_STRING(record)
            key_len = (r[0] << 8) | r[1]
            if 2 + key_len > record_len:
                raise ValueError("record key runs past its end")
            total += _size_publish(&meta[i], prefix_len + (1 + key_len if key_len else 0), record_len - 2 - key_len,
                                   packet_id, dup)
        out = PyBytes_FromStringAndSize(NULL, total)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        for i in range(count):
            record = <object>PyTuple_GET_ITEM(recs, i)
            r = <const uint8_t*>PyBytes_AS_STRING(record)
            record_len = PyBytes_GET_SIZE(record)
            key_len = (r[0] << 8) | r[1]
            p = _put_publish(p, &meta[i], PyBytes_AS_STRING(prefix), prefix_len, <const char*>(r + 2), key_len,
                             <const char*>(r + 2 + key_len), record_len - 2 - key_len)
        return out
    finally:
        free(meta)
