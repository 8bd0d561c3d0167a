"""A real ``broker`` process serving ordinary MQTT topics to real clients (mosquitto_pub/_sub and paho-mqtt)."""

import signal
import subprocess
from pathlib import Path

from tests.conftest import BrokerFactory
from tests.support import BIN_DIR, BrokerProcess, MosquittoSub, connect_packet, free_port, mosquitto_pub, mqtt_connack, wait_until


def test_mosquitto_pub_to_mosquitto_sub(broker: BrokerProcess) -> None:
    with MosquittoSub(broker.port, "a/b", 1).wait_subscribed() as sub:
        result = mosquitto_pub(broker.port, "a/b", "hi", 1)
        assert result.returncode == 0, result.stderr
        assert sub.lines(1) == ["a/b hi"]


def test_paho_qos_0_1_2_and_wildcards(broker: BrokerProcess, mqtt_client) -> None:
    sub = mqtt_client(broker.port, client_id="sub")
    assert [rc.value for rc in sub.subscribe("sensors/+/temp", qos=2)] == [2]
    pub = mqtt_client(broker.port, client_id="pub")
    for qos in (0, 1, 2):
        pub.publish(f"sensors/{qos}/temp", f"q{qos}".encode(), qos=qos)
    got = sub.expect(3)
    assert sorted((m.topic, m.payload) for m in got) == [
        ("sensors/0/temp", b"q0"), ("sensors/1/temp", b"q1"), ("sensors/2/temp", b"q2")]
    pub.publish("sensors/x/humidity", b"no", qos=1)
    assert sub.no_message(0.3)


def test_retained_message_reaches_a_later_subscriber(broker: BrokerProcess, mqtt_client) -> None:
    pub = mqtt_client(broker.port)
    pub.publish("config/mode", b"eco", qos=1, retain=True)
    sub = mqtt_client(broker.port)
    sub.subscribe("config/#", qos=1)
    [message] = sub.expect(1)
    assert (message.topic, message.payload, message.retain) == ("config/mode", b"eco", True)


def test_will_is_published_when_a_client_vanishes(broker: BrokerProcess, mqtt_client) -> None:
    import socket

    sub = mqtt_client(broker.port)
    sub.subscribe("status/#", qos=1)
    with socket.create_connection((broker.host, broker.port), timeout=5) as raw:
        raw.sendall(connect_packet("dying", will=("status/dying", b"gone", 1)))
        assert raw.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
    # The socket closed without DISCONNECT: the broker must publish the will.
    [message] = sub.expect(1)
    assert (message.topic, message.payload) == ("status/dying", b"gone")


def test_sigterm_stops_cleanly_and_sigkill_leaves_the_data_dir_reusable(broker_factory: BrokerFactory) -> None:
    first = broker_factory(["--log-level", "info"])
    assert "event loop uvloop" in first.log
    assert first.stop() == 0
    assert "stopped" in first.log
    assert mqtt_connack(first.host, first.port, timeout=0.5) is None
    assert not (first.data_dir / "LOCK").exists()  # a clean stop leaves no lock file behind

    first.start()
    assert first.kill() == -signal.SIGKILL
    assert (first.data_dir / "LOCK").exists()
    first.start()  # the lock died with the process: the same data dir starts again
    assert first.running


def test_config_file_sets_the_listen_address_and_flags_override_it(tmp_path: Path, broker_factory) -> None:
    from_file, from_flag = free_port(), free_port()
    config = tmp_path / "shoal.yaml"
    config.write_text(f"listen: 127.0.0.1:{from_file}\ndata_dir: {tmp_path / 'cfg-data'}\nhttp_listen: 127.0.0.1:0\n")

    process = subprocess.Popen([str(BIN_DIR / "broker"), "--config", str(config)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: mqtt_connack("127.0.0.1", from_file) == 0, 15, "broker on the config file's port")
        assert (tmp_path / "cfg-data" / "LOCK").exists()
    finally:
        process.terminate()
        assert process.wait(15) == 0

    overridden = broker_factory(["--config", str(config)], port=from_flag)
    assert overridden.running and mqtt_connack("127.0.0.1", from_flag) == 0
    assert mqtt_connack("127.0.0.1", from_file, timeout=0.5) is None


def test_default_data_dir_is_data_under_the_working_directory(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen([str(BIN_DIR / "broker"), "--listen", f"127.0.0.1:{port}", "--http-listen",
                                "127.0.0.1:0"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: mqtt_connack("127.0.0.1", port) == 0, 15, "broker to accept MQTT")
        assert (tmp_path / "data" / "LOCK").read_text().strip() == str(process.pid)
    finally:
        process.terminate()
        assert process.wait(15) == 0


def test_a_broken_connection_does_not_disturb_other_clients(broker: BrokerProcess, mqtt_client) -> None:
    import socket

    sub = mqtt_client(broker.port)
    sub.subscribe("t", qos=1)
    # Garbage instead of CONNECT, and a connection dropped mid-CONNECT.
    for junk in (b"\xff\xff\xff\xff\xff", b"\x10\x20\x00\x04MQ"):
        with socket.create_connection((broker.host, broker.port), timeout=2) as raw:
            raw.sendall(junk)
    mqtt_client(broker.port).publish("t", b"still here", qos=1)
    assert sub.expect(1)[0].payload == b"still here"
    assert broker.running


def test_a_queue_s_partition_count_cannot_change_across_restarts(tmp_path: Path, broker_factory) -> None:
    config = tmp_path / "shoal.yaml"
    config.write_text("queues:\n  orders: {partitions: 2}\n")
    first = broker_factory(["--config", str(config)])
    assert "queue orders: 2 partition(s)" in first.log
    assert first.stop() == 0

    config.write_text("queues:\n  orders: {partitions: 3}\n")
    result = subprocess.run([str(BIN_DIR / "broker"), "--listen", f"127.0.0.1:{first.port}", "--data-dir",
                             str(first.data_dir), "--config", str(config), "--log-level", "warning",
                             "--http-listen", "none"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "queue 'orders' has 2 partitions in the data directory but 3 in the configuration" in result.stderr
    assert "Traceback" not in result.stderr
