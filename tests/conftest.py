"""Fixtures shared by every test: real etcd and broker processes on free loopback ports, and MQTT clients.

- ``etcd``: a fresh single-member etcd, ready (``/health``) before the test starts, stopped afterwards.
- ``broker``: a started ``broker`` process (embedded mode) on a free port with its own data directory.
- ``broker_factory``: start more brokers, with extra flags; every one is stopped after the test.
- ``mqtt_client``: a factory of connected paho-mqtt clients, disconnected after the test.

The helpers behind them (``tests/support.py``) can be used directly for anything the fixtures don't cover.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support import BrokerProcess, EtcdProcess, MqttClient


#: Test modules that need no etcd, no mosquitto and no broker process (in-memory fakes, the native modules, the
#: configuration): they run on their own, anywhere the package is installed.
UNIT_MODULES = {"test_assignment", "test_cluster_units", "test_config", "test_frames", "test_layout", "test_link",
                "test_mqtt_codec", "test_native", "test_queue_manager", "test_replica_storage", "test_replication_units",
                "test_ring", "test_sessions", "test_storage", "test_topic_tree", "test_ops_units"}
TOOLS = ("etcd", "etcdctl", "mosquitto_pub", "mosquitto_sub", "mosquitto", "mosquitto_passwd", "stdbuf", "chromium",
         "chromedriver")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The integration tests drive real etcd and mosquitto processes: refuse to run them without (a clear error, not
    a skip: `make test` installs them). The unit modules run without."""
    if all(item.module is not None and item.module.__name__.rpartition(".")[2] in UNIT_MODULES for item in items):
        return
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise pytest.UsageError(f"missing {', '.join(missing)}: run `make test`, which installs them (the unit "
                                f"tests alone run without: {', '.join(sorted(UNIT_MODULES))})")


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.remove_data()


BrokerFactory = Callable[..., BrokerProcess]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    started: list[BrokerProcess] = []
    names = itertools.count()

    def start(args: Sequence[str] = (), *, wait: bool = True, **kwargs: Any) -> BrokerProcess:
        process = BrokerProcess(tmp_path / f"broker{next(names)}", args, **kwargs)
        started.append(process)
        if wait:
            process.start()
        else:
            process.spawn()
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> BrokerProcess:
    return broker_factory()


@pytest.fixture
def mqtt_client() -> Iterator[Callable[..., MqttClient]]:
    clients: list[MqttClient] = []

    def connect(port: int, **kwargs: Any) -> MqttClient:
        client = MqttClient(port, **kwargs)
        clients.append(client)
        return client.connect()

    yield connect
    for client in clients:
        try:
            client.disconnect()
        except Exception:  # a test may have broken the connection on purpose
            pass
