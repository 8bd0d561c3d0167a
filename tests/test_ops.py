"""Operating one node: /metrics counts exactly, the JSON API, administration under load, access control on the HTTP
API, $SYS topics, the queues CLI, and logs an operator can use. Real broker processes, real MQTT clients, real
HTTP."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.ops_support import basic, get, http, metric, scrape
from tests.support import BIN_DIR, BrokerProcess, MqttClient, mosquitto_pub, wait_until

pytestmark = pytest.mark.timeout(90)


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shoal.yaml"
    path.write_text(text)
    return path


def queue_counts(broker: BrokerProcess, queue: str) -> dict[str, float]:
    samples = scrape(broker.http)
    return {name: metric(samples, f"shoalmq_queue_messages_{name}", queue=queue)
            for name in ("ready", "unacked")} | {
            name: metric(samples, f"shoalmq_queue_messages_{name}_total", queue=queue)
            for name in ("published", "delivered", "redelivered", "acked", "dead_lettered", "expired", "purged")}


def test_metrics_count_publishes_deliveries_acks_and_redeliveries_exactly(tmp_path: Path, broker_factory,
                                                                         mqtt_client) -> None:
    broker = broker_factory(["--config", str(config(tmp_path, "queues:\n  jobs: {partitions: 4}\n"))])
    publisher = mqtt_client(broker.port)
    for i in range(50):
        publisher.publish("$queue/jobs", f"m{i}".encode())
    assert queue_counts(broker, "jobs") == {"ready": 50, "unacked": 0, "published": 50, "delivered": 0,
                                            "redelivered": 0, "acked": 0, "dead_lettered": 0, "expired": 0,
                                            "purged": 0}

    first = MqttClient(broker.port, client_id="first", manual_ack=True).connect()
    first.subscribe("$queue/jobs")
    got = first.expect(50)
    for message in got[:20]:
        first.ack(message)
    wait_until(lambda: queue_counts(broker, "jobs")["acked"] == 20, 10, "20 acks counted")
    counts = queue_counts(broker, "jobs")
    assert (counts["ready"], counts["unacked"], counts["delivered"]) == (0, 30, 50)
    samples = scrape(broker.http)
    assert metric(samples, "shoalmq_queue_consumers", queue="jobs") == 1
    assert sum(metric(samples, "shoalmq_partition_messages_unacked", queue="jobs", partition=str(p))
               for p in range(4)) == 30

    first.client.disconnect()  # without acking the other 30: they are delivered again
    wait_until(lambda: queue_counts(broker, "jobs")["ready"] == 30, 10, "30 requeued")
    second = mqtt_client(broker.port, client_id="second")
    second.subscribe("$queue/jobs")
    again = second.expect(30)
    assert all(m.dup for m in again)
    wait_until(lambda: queue_counts(broker, "jobs")["acked"] == 50, 10, "every ack counted")
    assert queue_counts(broker, "jobs") == {"ready": 0, "unacked": 0, "published": 50, "delivered": 80,
                                            "redelivered": 30, "acked": 50, "dead_lettered": 0, "expired": 0,
                                            "purged": 0}
    samples = scrape(broker.http)
    assert metric(samples, "shoalmq_messages_received_total") == 50
    assert metric(samples, "shoalmq_messages_sent_total") == 80
    assert metric(samples, "shoalmq_commits_total") >= 1
    assert metric(samples, "shoalmq_commit_duration_seconds_count") == metric(samples, "shoalmq_commits_total")
    assert metric(samples, "shoalmq_connections") == 2  # the publisher and the second consumer
    assert metric(samples, "shoalmq_ready") == 1


def test_refusals_expiry_and_dead_letters_are_counted_with_their_reason_and_logged(
        tmp_path: Path, broker_factory, mqtt_client) -> None:
    path = config(tmp_path, "queues:\n  jobs: {partitions: 1, max_deliveries: 1}\n"
                            "  brief: {partitions: 1, ttl: 0.2}\n")
    broker = broker_factory(["--config", str(path)])
    # A payload over max_payload, and a dead-letter queue of no queue: refused, and neither creates a queue.
    for topic, payload in (("$queue/big", b"x" * 300_000), ("$queue/nothing.dlq", b"m")):
        assert mosquitto_pub(broker.port, topic, payload).returncode != 0  # (closed: not acknowledged)
    names = {q["name"] for q in get(f"{broker.http}/v1/queues")["queues"]}
    assert names == {"jobs", "brief"}
    samples = scrape(broker.http)
    assert metric(samples, "shoalmq_queue_messages_refused_total", queue="big", reason="too_large") == 1
    assert metric(samples, "shoalmq_queue_messages_refused_total", queue="nothing.dlq", reason="not_created") == 1

    publisher = mqtt_client(broker.port)
    publisher.publish("$queue/brief", b"gone before anyone asks")
    consumer = MqttClient(broker.port, client_id="dropper", manual_ack=True).connect()
    publisher.publish("$queue/jobs", b"poison")
    consumer.subscribe("$queue/jobs")
    consumer.expect(1)
    consumer.client.disconnect()  # its 1st (and last allowed) delivery, not acked: dead-lettered
    wait_until(lambda: queue_counts(broker, "jobs")["dead_lettered"] == 1, 10, "the dead letter counted")
    wait_until(lambda: "moved to jobs.dlq after 1 delivery attempt(s)" in broker.log, 10, "the dead letter logged")
    assert "client dropper from 127.0.0.1 left with 1 unacknowledged queue message(s): 0 requeued, 1 moved to the " \
           "dead-letter queue" in broker.log

    late = mqtt_client(broker.port)
    time.sleep(0.3)  # (the message's ttl must pass: time is what is tested)
    late.subscribe("$queue/brief")
    wait_until(lambda: queue_counts(broker, "brief")["expired"] == 1, 10, "the expiry counted")
    assert "queue brief: 1 message(s) expired before delivery (ttl 0.2 s)" in broker.log
    assert late.no_message(0.2)


def test_json_api_describes_a_single_node_its_queues_and_consumers(tmp_path: Path, broker_factory,
                                                                   mqtt_client) -> None:
    broker = broker_factory(["--config", str(config(tmp_path, "queues:\n  orders: {partitions: 3}\n"))])
    assert get(f"{broker.http}/healthz")["status"] == "alive"
    assert get(f"{broker.http}/readyz") == {"ready": True, "reasons": [], "node": "local"}
    info = get(f"{broker.http}/v1/cluster/info")
    assert (info["mode"], info["nodes"], info["queues"], info["partitions"]) == ("single", 1, 1, 3)
    members = get(f"{broker.http}/v1/cluster/members")["members"]
    assert [(m["node"], m["reachable"], m["ready"]) for m in members] == [("local", True, True)]

    publisher = mqtt_client(broker.port)
    for i in range(7):
        publisher.publish("$queue/orders", b"o")
    consumer = MqttClient(broker.port, client_id="worker-1", manual_ack=True).connect()
    consumer.subscribe("$queue/orders")
    consumer.expect(7)
    orders = get(f"{broker.http}/v1/queues/orders")
    assert (orders["ready"], orders["unacked"], orders["settings"]["partitions"]) == (0, 7, 3)
    assert [(c["client_id"], c["node"], c["unacked"]) for c in orders["consumers"]] == [("worker-1", "local", 7)]
    assert orders["consumers"][0]["address"] == "127.0.0.1"
    assert sorted(p["partition"] for p in orders["partitions"]) == [0, 1, 2]
    partitions = get(f"{broker.http}/v1/cluster/partitions")["partitions"]
    assert sum(p["depth"] for p in partitions) == 7 and {p["leader"] for p in partitions} == {"local"}
    assert [q["name"] for q in get(f"{broker.http}/v1/queues")["queues"]] == ["orders"]

    status, body, headers = http(f"{broker.http}/v1/queues/nope")
    assert status == 404 and body["error"] == "no queue named 'nope'" and headers["Content-Type"].startswith(
        "application/json")
    status, body, _ = http(f"{broker.http}/v1/nowhere")
    assert status == 404 and body["status"] == 404
    status, body, _ = http(f"{broker.http}/v1/queues", method="POST")
    assert status == 405 and "error" in body
    status, body, _ = http(f"{broker.http}/v1/nodes/local/drain", method="POST")
    assert status == 409 and "single node" in body["error"]
    page = urlopen_text(f"{broker.http}/")
    assert "<title>ShoalMQ</title>" in page and "http://" not in page.replace("http://www.w3.org", "")


def urlopen_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_purge_under_load_loses_nothing_published_after_it(tmp_path: Path, broker_factory) -> None:
    broker = broker_factory(["--config", str(config(tmp_path, "queues:\n  work: {partitions: 4}\n"))])
    acked: list[str] = []
    stop = threading.Event()

    def publish() -> None:
        client = MqttClient(broker.port, client_id="pub").connect()
        i = 0
        while not stop.is_set():
            client.publish("$queue/work", f"{i}".encode())
            acked.append(str(i))
            i += 1
        client.disconnect()

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        wait_until(lambda: len(acked) >= 300, 20, "publishes before the purge")
        status, body, _ = http(f"{broker.http}/v1/queues/work/purge", method="POST")
        assert status == 200 and body["nodes"] == {"local": body["purged"]}
        purged = body["purged"]
        wait_until(lambda: len(acked) >= 300 + purged + 200, 20, "publishes after the purge")
    finally:
        stop.set()
        thread.join(20)
    consumer = MqttClient(broker.port, client_id="drain").connect()
    consumer.subscribe("$queue/work")
    remaining = len(acked) - purged
    received = [m.payload.decode() for m in consumer.expect(remaining, timeout=30)]
    assert consumer.no_message(0.3)
    # Every acknowledged message was either purged or is delivered, once; what was delivered came last.
    assert len(set(received)) == remaining and set(received) <= set(acked)
    assert sorted(map(int, received))[-1] == len(acked) - 1
    assert queue_counts(broker, "work")["purged"] == purged
    again = http(f"{broker.http}/v1/queues/work/purge", method="POST")[1]
    assert again["purged"] == 0  # idempotent


def test_redrive_moves_dead_letters_back_and_delete_removes_a_queue_for_good(tmp_path: Path, broker_factory,
                                                                              mqtt_client) -> None:
    path = config(tmp_path, "queues:\n  jobs: {partitions: 2, max_deliveries: 1}\n")
    broker = broker_factory(["--config", str(path)])
    publisher = mqtt_client(broker.port)
    for key in ("a", "b", "c"):
        publisher.publish(f"$queue/jobs/{key}", key.encode())
    flaky = MqttClient(broker.port, client_id="flaky", manual_ack=True).connect()
    flaky.subscribe("$queue/jobs")
    flaky.expect(3)
    flaky.client.disconnect()
    wait_until(lambda: http(f"{broker.http}/v1/queues/jobs.dlq")[1].get("ready") == 3, 10, "3 dead letters")

    status, body, _ = http(f"{broker.http}/v1/queues/jobs/redrive", method="POST")
    assert status == 200 and body["moved"] == 3 and body["queue"] == "jobs"
    assert get(f"{broker.http}/v1/queues/jobs.dlq")["ready"] == 0
    fixed = mqtt_client(broker.port, client_id="fixed")
    fixed.subscribe("$queue/jobs")
    back = fixed.expect(3)
    assert sorted((m.topic, m.payload) for m in back) == [(f"$queue/jobs/{k}", k.encode()) for k in "abc"]
    assert http(f"{broker.http}/v1/queues/jobs/redrive", method="POST")[1]["moved"] == 0
    assert http(f"{broker.http}/v1/queues/jobs.dlq", method="GET")[1]["redriven"] == 3
    status, body, _ = http(f"{broker.http}/v1/queues/jobs.dlq/redrive?limit=x", method="POST")
    assert status == 400

    # Delete: refused while the queue has a consumer, then done; gone after a restart too.
    publisher.publish("$queue/temp", b"1")
    holder = mqtt_client(broker.port, client_id="holder")
    holder.subscribe("$queue/temp")
    holder.expect(1)
    status, body, _ = http(f"{broker.http}/v1/queues/temp", method="DELETE")
    assert status == 409 and "consumer" in body["error"]
    holder.disconnect()
    publisher.publish("$queue/temp", b"2")
    wait_until(lambda: get(f"{broker.http}/v1/queues/temp")["consumers"] == [], 10, "the consumer gone")
    status, body, _ = http(f"{broker.http}/v1/queues/temp", method="DELETE")
    assert status == 200 and body == {"queue": "temp", "deleted": True, "messages": 1}
    assert http(f"{broker.http}/v1/queues/temp")[0] == 404
    assert http(f"{broker.http}/v1/queues/temp", method="DELETE")[0] == 404
    broker.stop()
    broker.start()
    names = {q["name"] for q in get(f"{broker.http}/v1/queues")["queues"]}
    assert "temp" not in names and "jobs" in names
    assert "queue temp:" not in broker.log.rpartition("==== start ")[2]


PASSWORDS = {"admin": "s3cret", "reader": "r3ad"}


def secured_broker(tmp_path: Path, broker_factory) -> BrokerProcess:
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text("user admin\ntopic readwrite #\ntopic write $SYS/shoalmq/admin\n\nuser reader\ntopic read #\n")
    token = tmp_path / "token"
    token.write_text("t0ken-for-scripts\n")
    return broker_factory(["--password-file", str(passwd), "--acl-file", str(acl), "--http-token-file", str(token)])


def test_http_api_access_follows_the_password_file_and_the_acl(tmp_path: Path, broker_factory) -> None:
    broker = secured_broker(tmp_path, broker_factory)
    purge = f"{broker.http}/v1/queues/jobs/purge"
    assert get(f"{broker.http}/metrics".replace("/metrics", "/healthz"))["status"] == "alive"  # open on loopback
    status, body, headers = http(purge, method="POST")
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="ShoalMQ"' and "credentials" in body["error"]
    assert http(purge, method="POST", auth=basic("admin", "wrong"))[0] == 401
    status, body, _ = http(purge, method="POST", auth=basic("reader", "r3ad"))
    assert status == 403 and "not an administrator" in body["error"]
    assert http(purge, method="POST", auth="Bearer nope")[0] == 401
    # Authorised: the queue does not exist, which is the answer (404), not a refusal.
    assert http(purge, method="POST", auth=basic("admin", "s3cret"))[0] == 404
    assert http(purge, method="POST", auth="Bearer t0ken-for-scripts")[0] == 404
    assert "s3cret" not in broker.log and "t0ken" not in broker.log


def test_an_http_api_beyond_loopback_needs_authentication(tmp_path: Path) -> None:
    from tests.support import free_port

    done = subprocess.run([str(BIN_DIR / "broker"), "--listen", f"127.0.0.1:{free_port()}", "--http-listen",
                           f"0.0.0.0:{free_port()}", "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "(HTTP)" in done.stderr and "allow_anonymous" in done.stderr


def test_the_http_api_over_https_with_the_cli_verifying_its_certificate(tmp_path: Path, broker_factory) -> None:
    import ssl
    import urllib.request

    from tests.tls_support import Authority

    authority = Authority(tmp_path / "pki", "HTTP CA")
    pair = authority.issue("localhost", server=True)
    broker = broker_factory(["--http-certfile", str(pair.cert), "--http-keyfile", str(pair.key)])
    url = f"https://127.0.0.1:{broker.http_port}"
    assert f"HTTP API, metrics and dashboard on {url}/" in broker.log
    context = ssl.create_default_context(cafile=str(authority.path))
    with urllib.request.urlopen(f"{url}/healthz", timeout=10, context=context) as response:
        assert response.status == 200
    with pytest.raises(OSError):  # plain HTTP on the HTTPS port gets no answer
        urllib.request.urlopen(f"{broker.http}/healthz", timeout=10).read()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN_DIR / "broker"), "queues", "list", "--http", url, *args],
                              capture_output=True, text=True, timeout=30)

    listed = cli("--cafile", str(authority.path), "--json")
    assert listed.returncode == 0 and '"queues": []' in listed.stdout, listed.stderr
    refused = cli()  # (the system's CAs do not know this one)
    assert refused.returncode == 1 and "certificate verify failed" in refused.stderr, refused.stderr
    # SIGHUP: a new certificate for new connections.
    import signal
    import socket

    def serial() -> int:
        with socket.create_connection(("127.0.0.1", broker.http_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            return int(tls.getpeercert()["serialNumber"], 16)

    first = serial()
    renewed = authority.issue("localhost", server=True)
    pair.cert.write_bytes(renewed.cert.read_bytes())
    pair.key.write_bytes(renewed.key.read_bytes())
    broker.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "reloaded the HTTPS certificate" in broker.log, 10, "the reload")
    assert serial() != first
    half = subprocess.run([str(BIN_DIR / "broker"), "--http-certfile", str(pair.cert), "--data-dir",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=30)
    assert half.returncode == 2 and "--http-certfile and --http-keyfile go together" in half.stderr


def test_sys_topics_are_published_as_mosquitto_names_them(tmp_path: Path, broker_factory, mqtt_client) -> None:
    broker = broker_factory(["--sys-interval", "1"])
    publisher = mqtt_client(broker.port)
    for _ in range(4):
        publisher.publish("$queue/orders", b"x")
    publisher.publish("plain/topic", b"y")
    wanted = {"$SYS/broker/version", "$SYS/broker/uptime", "$SYS/broker/clients/connected",
              "$SYS/broker/messages/received", "$SYS/broker/subscriptions/count",
              "$SYS/broker/load/messages/received/1min", "$SYS/shoalmq/queues/orders/depth", "$SYS/shoalmq/topology"}

    def seen() -> dict[str, str]:
        out = subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t", "$SYS/#", "-v", "-W", "2"],
                             capture_output=True, text=True, timeout=10).stdout
        values = {}
        for line in out.splitlines():
            topic, _, value = line.partition(" ")
            values[topic] = value
        return values if wanted <= set(values) and values.get("$SYS/shoalmq/queues/orders/depth") == "4" else {}

    values = wait_until(seen, 20, "the $SYS topics")
    assert values["$SYS/broker/version"].startswith("ShoalMQ version ")
    assert values["$SYS/broker/messages/received"] == "5"
    assert int(values["$SYS/broker/clients/connected"]) >= 1
    assert '"orders":{"leaders":["local"' in values["$SYS/shoalmq/topology"]
    # A client may not publish to $SYS: the connection is closed.
    intruder = MqttClient(broker.port, timeout=2).connect()
    with pytest.raises(TimeoutError):
        intruder.publish("$SYS/broker/version", b"fake")


def test_queues_cli_lists_describes_purges_redrives_and_deletes(tmp_path: Path, broker_factory, mqtt_client) -> None:
    broker = broker_factory(["--config", str(config(tmp_path, "queues:\n  jobs: {partitions: 2}\n"))])
    publisher = mqtt_client(broker.port)
    for _ in range(5):
        publisher.publish("$queue/jobs", b"j")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN_DIR / "broker"), "queues", *args, "--http", f"127.0.0.1:{broker.http_port}"],
                              capture_output=True, text=True, timeout=30)

    listed = cli("list")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split()[:3] == ["QUEUE", "READY", "UNACKED"]
    assert listed.stdout.splitlines()[1].split()[:3] == ["jobs", "5", "0"]
    described = cli("describe", "jobs")
    assert described.returncode == 0 and described.stdout.startswith("queue jobs: 5 ready, 0 unacked")
    missing = cli("describe", "nope")
    assert missing.returncode == 1 and missing.stderr.strip() == \
        "broker queues describe: error: no queue named 'nope' (HTTP 404)"
    assert cli("purge", "jobs").stdout == "purged 5 message(s) of jobs\n"
    assert cli("redrive", "jobs").returncode == 1  # no dead-letter queue yet
    assert cli("delete", "jobs").stdout == "deleted queue jobs with 0 message(s)\n"
    assert cli("list").stdout == "no queues\n"
    down = subprocess.run([str(BIN_DIR / "broker"), "queues", "list", "--http", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "cannot reach the HTTP API at 127.0.0.1:1" in down.stderr


def test_a_repeated_refusal_is_logged_once_with_the_peer_address(tmp_path: Path, broker_factory) -> None:
    broker = broker_factory(["--auto-create-queues", "false"])
    for _ in range(5):
        assert mosquitto_pub(broker.port, "$queue/unknown", "m", 1, "-i", "retrier").returncode != 0
    wait_until(lambda: metric(scrape(broker.http), "shoalmq_queue_messages_refused_total", queue="unknown",
                              reason="not_created") == 5, 10, "5 refusals counted")
    lines = [line for line in broker.log.splitlines() if "auto_create_queues is off" in line]
    assert len(lines) == 1 and "client retrier from 127.0.0.1:" in lines[0]
