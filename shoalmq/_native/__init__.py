"""Hot-path code compiled with Cython, each module beside a pure-Python twin with the same interface.

The compiled modules are used unless ``SHOALMQ_PURE_PYTHON=1`` is set (for debugging, or to run the suite
against the twins). A missing compiled module is an error, not a silent fallback: a broker quietly running
its hot path in pure Python would be several times slower with nothing to say why.

This package knows nothing of queues or the network; of MQTT, ``mqtt_codec`` knows the framing of a few packets
and ``topic_tree`` how topic filters match topic names (no sessions).
"""

import os

from ._errors import MalformedPacket, RingFull  # one class each, raised by both a module and its twin

PURE_PYTHON = os.environ.get("SHOALMQ_PURE_PYTHON", "") not in ("", "0")

if PURE_PYTHON:
    from . import hashing_py as hashing
    from . import mqtt_codec_py as mqtt_codec
    from . import ring_py as ring
    from . import segment_py as segment
    from . import topic_tree_py as topic_tree
else:
    try:
        from . import hashing, mqtt_codec, ring, segment, topic_tree
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "shoalmq's Cython extensions are not built; reinstall the package "
            "(`pip install .` compiles them) or set SHOALMQ_PURE_PYTHON=1"
        ) from exc

fnv1a_32 = hashing.fnv1a_32
partition_of = hashing.partition_of
RingBuffer = ring.RingBuffer
TopicTree = topic_tree.TopicTree

__all__ = [
    "PURE_PYTHON", "MalformedPacket", "RingBuffer", "RingFull", "TopicTree", "fnv1a_32", "hashing", "mqtt_codec",
    "partition_of", "ring", "segment", "topic_tree",
]
