"""The project's load tool: measure any MQTT 3.1.1 broker with many publisher and consumer processes.

Run it as ``python -m bench.loadtool --port PORT [...]`` from the repository root (``--help`` lists the flags;
``bench/README.md`` has examples). Each publisher and consumer is its own process speaking MQTT 3.1.1 over a raw
socket (``mqtt.py``); the hot loops are in ``workers.py``; flags, orchestration and the report in ``cli.py``.
"""

from bench.loadtool.cli import main

__all__ = ["main"]
