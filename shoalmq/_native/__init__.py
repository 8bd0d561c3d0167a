"""Hot-path code compiled with Cython, each module beside a pure-Python twin with the same interface.

The compiled modules are used unless ``SHOALMQ_PURE_PYTHON=1`` is set (for debugging, or to run the suite
against the twins). A missing compiled module is an error, not a silent fallback: a broker quietly running
its hot path in pure Python would be several times slower with nothing to say why.

This package knows nothing of MQTT, queues or the network.
"""

import os

from ._errors import RingFull  # one class, raised by both ring and ring_py

PURE_PYTHON = os.environ.get("SHOALMQ_PURE_PYTHON", "") not in ("", "0")

if PURE_PYTHON:
    from . import hashing_py as hashing
    from . import ring_py as ring
    from . import segment_py as segment
else:
    try:
        from . import hashing, ring, segment
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "shoalmq's Cython extensions are not built; reinstall the package "
            "(`pip install .` compiles them) or set SHOALMQ_PURE_PYTHON=1"
        ) from exc

fnv1a_32 = hashing.fnv1a_32
partition_of = hashing.partition_of
RingBuffer = ring.RingBuffer

__all__ = ["PURE_PYTHON", "RingBuffer", "RingFull", "fnv1a_32", "hashing", "partition_of", "ring", "segment"]
