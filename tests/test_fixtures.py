"""The shared fixtures themselves: they must give real, isolated processes on free ports."""

import signal

from tests.support import RESERVED_PORTS, BrokerProcess, EtcdProcess, free_port, mqtt_connack


def test_free_ports_avoid_reserved_ones_and_never_repeat() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert not set(ports) & RESERVED_PORTS


def test_etcd_is_real_and_reachable_by_etcd3gw_and_etcdctl(etcd: EtcdProcess) -> None:
    assert etcd.client_port not in RESERVED_PORTS and etcd.peer_port not in RESERVED_PORTS
    client = etcd.client()
    assert client.put(b"/shoalmq-test/k", b"v1")
    assert client.get(b"/shoalmq-test/k") == [b"v1"]
    assert etcd.etcdctl("get", "--print-value-only", "/shoalmq-test/k").strip() == "v1"


def test_etcd_restart_keeps_its_data(etcd: EtcdProcess) -> None:
    etcd.client().put(b"/k", b"kept")
    etcd.stop()
    assert not etcd.running
    etcd.start()
    assert etcd.client().get(b"/k") == [b"kept"]


def test_broker_fixture_is_ready_and_can_be_killed(broker: BrokerProcess) -> None:
    assert broker.port not in RESERVED_PORTS
    assert mqtt_connack(broker.host, broker.port) == 0
    assert str(broker.data_dir).startswith(str(broker.workdir))
    assert broker.kill() == -signal.SIGKILL
    assert not broker.running
    assert "ready" in broker.log
