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


def pytest_configure(config: pytest.Config) -> None:
    missing = [tool for tool in ("etcd", "etcdctl", "mosquitto_pub", "mosquitto_sub", "mosquitto", "stdbuf")
               if shutil.which(tool) is None]
    if missing:
        raise pytest.UsageError(f"missing {', '.join(missing)}: run `make test`, which installs them")


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
