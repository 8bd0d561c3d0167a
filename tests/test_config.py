"""Configuration: defaults, the YAML file, flags over the file, and a clear error for every bad value."""

import dataclasses
from pathlib import Path

import pytest

from shoalmq.cmd.broker import load_config
from shoalmq.config import FILE_SECTIONS, OPTIONS, Config, HostPort, build_config, read_config_file
from shoalmq.queue.config import QueueConfig
from shoalmq.errors import ConfigError


def test_every_option_is_a_config_field_and_every_field_an_option() -> None:
    assert [o.key for o in OPTIONS] + list(FILE_SECTIONS) == [f.name for f in dataclasses.fields(Config)]
    assert all(o.flag == "--" + o.key.replace("_", "-") for o in OPTIONS)


def test_defaults_are_the_embedded_single_node() -> None:
    config = load_config([])
    assert config == Config()
    assert config.listen == HostPort("127.0.0.1", 1883)
    assert config.data_dir == Path("./data")
    assert config.log_level == "info"
    # Config() field defaults and the option table's defaults agree.
    assert build_config() == Config()


def test_file_values_are_used_and_flags_override_them(tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text("listen: 0.0.0.0:2000\ndata_dir: /var/lib/shoal\nlog_level: debug\n")
    from_file = load_config(["--config", str(path)])
    assert from_file == Config(HostPort("0.0.0.0", 2000), Path("/var/lib/shoal"), "debug")
    overridden = load_config(["--config", str(path), "--listen", "127.0.0.1:3000", "--log-level", "WARNING"])
    assert overridden == Config(HostPort("127.0.0.1", 3000), Path("/var/lib/shoal"), "warning")


def test_storage_settings(tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text("sync: async\nbatch_size: 100\nflush_interval_ms: 5\nring_capacity: 1024\n")
    config = load_config(["--config", str(path), "--batch-size", "250"])
    assert (config.sync, config.batch_size, config.flush_interval_ms, config.ring_capacity) == ("async", 250, 5, 1024)
    assert (Config().sync, Config().batch_size, Config().flush_interval_ms, Config().ring_capacity) == (
        "fsync", 500, 10, 16384)


@pytest.mark.parametrize("args, message", [
    (["--sync", "sometimes"], "--sync: expected one of fsync, async"),
    (["--batch-size", "0"], "--batch-size: expected a whole number from 1 to 100000"),
    (["--batch-size", "ten"], "--batch-size: expected a whole number"),
    (["--ring-capacity", "1000"], "--ring-capacity: expected a power of two, got 1000"),
    (["--flush-interval-ms", "-1"], "--flush-interval-ms: expected a whole number from 0"),
])
def test_bad_storage_settings(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(args)


def test_memory_budget_settings(tmp_path: Path) -> None:
    assert (Config().ring_bytes, Config().memory_budget) == (8 << 20, 256 << 20)
    assert (load_config([]).ring_bytes, load_config([]).memory_budget) == (8 << 20, 256 << 20)
    path = tmp_path / "shoal.yaml"
    path.write_text("ring_bytes: 1048576\nmemory_budget: 2GiB\n")
    config = load_config(["--config", str(path)])
    assert (config.ring_bytes, config.memory_budget) == (1 << 20, 2 << 30)
    config = load_config(["--config", str(path), "--ring-bytes", "512KiB", "--memory-budget", "64 MiB"])
    assert (config.ring_bytes, config.memory_budget) == (512 << 10, 64 << 20), "flags override the file"


@pytest.mark.parametrize("text, expected", [
    ("1", 1), ("4096", 4096), ("  8388608 ", 8 << 20), ("100B", 100), ("4KiB", 4 << 10), ("8MiB", 8 << 20),
    ("8 MiB", 8 << 20), ("8mib", 8 << 20), ("3GiB", 3 << 30), ("1TiB", 1 << 40),
])
def test_sizes_are_bytes_with_an_optional_binary_unit(text: str, expected: int) -> None:
    assert load_config(["--ring-bytes", text]).ring_bytes == expected
    assert load_config(["--memory-budget", text]).memory_budget == expected


@pytest.mark.parametrize("args, message", [
    (["--ring-bytes", "0"], "--ring-bytes: expected a number of bytes from 1 to"),
    (["--ring-bytes", "-5"], "--ring-bytes: expected a number of bytes"),
    (["--ring-bytes", "8MB"], r"--ring-bytes: expected a number of bytes, optionally with a unit \(KiB, MiB"),
    (["--ring-bytes", "8M"], "--ring-bytes: expected a number of bytes, optionally with a unit"),
    (["--ring-bytes", "1.5MiB"], "--ring-bytes: expected a number of bytes"),
    (["--ring-bytes", "MiB"], "--ring-bytes: expected a number of bytes"),
    (["--ring-bytes", "2TiB"], "--ring-bytes: expected a number of bytes from 1 to 1099511627776"),
    (["--memory-budget", "lots"], "--memory-budget: expected a number of bytes"),
    (["--memory-budget", ""], "--memory-budget: expected a number of bytes"),
])
def test_bad_sizes_name_the_flag(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(args)


@pytest.mark.parametrize("text, message", [
    ("ring_bytes: 8.5\n", "ring_bytes: expected a number of bytes"),
    ("ring_bytes: true\n", "ring_bytes: expected a number of bytes"),
    ("memory_budget: [1]\n", "memory_budget: expected a number of bytes"),
])
def test_bad_sizes_in_a_file_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"config file {path}: {message}"):
        load_config(["--config", str(path)])


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(["--config", str(path)]) == Config()


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:1", HostPort("127.0.0.1", 1)),
    ("localhost:65535", HostPort("localhost", 65535)),
    ("[::1]:1884", HostPort("::1", 1884)),
])
def test_host_port_parses(text: str, expected: HostPort) -> None:
    assert HostPort.parse(text) == expected
    assert HostPort.parse(str(expected)) == expected


@pytest.mark.parametrize("text, message", [
    ("1883", "expected HOST:PORT"),
    (":1883", "expected HOST:PORT"),
    ("host:", "port must be a number"),
    ("host:0", "port must be a number from 1 to 65535"),
    ("host:70000", "port must be a number from 1 to 65535"),
    ("host:http", "port must be a number"),
    ("::1:1883", "in brackets"),
    ("[nope]:1883", "not an IPv6 address"),
])
def test_bad_listen_values_name_the_flag_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(["--listen", text])
    assert str(info.value).startswith("--listen: ")


def test_bad_value_in_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: 1883\n")
    with pytest.raises(ConfigError, match=r"config file .*c\.yaml: listen: expected HOST:PORT as a string"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("text, message", [
    ("listen: [1, 2\n", r"expected ',' or ']'.* at line 2"),
    ("- a\n- b\n", "expected a mapping of settings"),
    ("lisen: 127.0.0.1:1\n", "unknown setting 'lisen'"),
    ("data-dir: /x\n", "did you mean 'data_dir'"),
    ("log_level: loud\n", "log_level: expected one of debug, info, warning, error"),
    ("batch_size: true\n", "batch_size: expected a whole number"),
])
def test_bad_files_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(path)])


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*: No such file or directory"):
        read_config_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read config file .*: Is a directory"):
        read_config_file(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00listen")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_config_file(binary)


def test_queues_section(tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text("consumer_window: 8\nqueue_defaults: {partitions: 2, ack_timeout: 5}\n"
                    "queues:\n  orders: {partitions: 16, max_depth: 1000, ttl: 3600, max_deliveries: 3}\n  jobs:\n")
    config = load_config(["--config", str(path)])
    assert config.consumer_window == 8
    # (A single node: one replica, whatever the settings leave open.)
    assert config.queue_defaults == QueueConfig(partitions=2, ack_timeout=5, replication_factor=1)
    assert config.queues == {"orders": QueueConfig(partitions=16, max_depth=1000, ttl=3600, max_deliveries=3,
                                                   replication_factor=1),
                             "jobs": QueueConfig(replication_factor=1)}
    assert Config().queues == {} and Config().queue_defaults == QueueConfig(replication_factor=1)


def test_replication_factor_defaults_to_three_in_a_cluster_and_the_flag_sets_what_settings_leave_open(
        tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text("queues:\n  orders: {replication_factor: 1}\n  jobs: {}\n")
    clustered = load_config(["--config", str(path), "--etcd", "http://127.0.0.1:1"])
    assert clustered.queue_defaults.replication_factor == 3
    assert clustered.queues["orders"].replication_factor == 1 and clustered.queues["jobs"].replication_factor == 3
    flagged = load_config(["--config", str(path), "--etcd", "http://127.0.0.1:1", "--replication-factor", "2"])
    assert flagged.queue_defaults.replication_factor == 2 and flagged.queues["jobs"].replication_factor == 2
    assert flagged.queues["orders"].replication_factor == 1
    assert flagged.queue_defaults.min_insync_replicas == 2
    assert load_config(["--config", str(path)]).queues["jobs"].replication_factor == 1


@pytest.mark.parametrize("text, message", [
    ("queues: {orders: {partitions: -1}}\n", r"config file .*: queues: orders: partitions must be a whole number"),
    ("queues: {'a b': {}}\n", "queues: bad queue name 'a b'"),
    ("queue_defaults: {color: red}\n", "queue_defaults: unknown queue setting 'color'"),
    ("queue_defaults: 5\n", "queue_defaults: expected a mapping"),
])
def test_bad_queue_settings(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("text, message", [
    ("queues: {big: {max_payload: 1048576}}\n",
     r"queue 'big': max_payload 1,048,576 does not fit in max_packet_size 1,048,576 \(a PUBLISH to \$queue/big "
     r"carries at least 18 bytes more\): raise max_packet_size or lower max_payload"),
    ("queue_defaults: {max_payload: 2097152}\n",
     r"queue_defaults: max_payload 2,097,152 does not fit in max_packet_size"),
])
def test_a_max_payload_that_no_packet_can_carry_is_refused_at_start(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(path)])
    # Raising the packet limit is the way out.
    config = load_config(["--config", str(path), "--max-packet-size", str(4 << 20)])
    assert config.max_packet_size == 4 << 20


def test_the_default_max_payload_is_lowered_to_what_max_packet_size_allows(tmp_path: Path) -> None:
    config = load_config(["--max-packet-size", "65536"])
    assert config.queue_defaults.max_payload == 65536 - 16  # header (4), topic "$queue/q" (2 + 8), packet id (2)
    path = tmp_path / "q.yaml"
    path.write_text("queues: {orders: {partitions: 2}}\n")
    assert load_config(["--config", str(path), "--max-packet-size", "65536"]).queues["orders"].max_payload == 65536 - 21
    assert load_config([]).queue_defaults.max_payload == 256 * 1024  # fits the default 1 MiB packets


def test_cluster_settings(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("etcd: http://10.0.0.1:2379,10.0.0.2:2379\nnode_id: n1\nrouting: direct\nlease_ttl: 7\n")
    config = load_config(["--config", str(path), "--grpc-listen", "127.0.0.1:7001", "--advertise", "node1.lan"])
    assert config.etcd == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert (config.node_id, config.routing, config.lease_ttl, config.cluster) == ("n1", "direct", 7, "shoalmq")
    assert (str(config.grpc_listen), config.advertise) == ("127.0.0.1:7001", "node1.lan")
    assert Config().etcd is None and Config().routing == "proxy"  # without --etcd: the single node


@pytest.mark.parametrize("args, message", [
    (["--etcd", "ftp://h:1"], "--etcd: bad etcd endpoint"),
    (["--etcd", "http://h"], "--etcd: bad etcd endpoint"),
    (["--node-id", "a/b"], "--node-id: expected 1-64 letters"),
    (["--cluster", ""], "--cluster: expected 1-64 letters"),
    (["--routing", "mesh"], "--routing: expected one of proxy, direct"),
    (["--lease-ttl", "1"], "--lease-ttl: expected a whole number from 2 to 60"),
    (["--grpc-listen", "7001"], "--grpc-listen: expected HOST:PORT"),
])
def test_bad_cluster_settings(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(args)


@pytest.mark.parametrize("text, seconds", [("3600", 3600), ("2h", 7200), ("1d", 86400), ("1w", 604800),
                                           ("1m", 30 * 86400), ("1y", 365 * 86400)])
def test_persistent_client_expiration_takes_seconds_or_mosquitto_s_durations(text: str, seconds: int) -> None:
    assert load_config(["--persistent-client-expiration", text]).persistent_client_expiration == seconds
    assert load_config([]).persistent_client_expiration is None


@pytest.mark.parametrize("text", ["0", "-5", "2x", "h", "1.5h"])
def test_a_bad_expiration_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--persistent-client-expiration: expected a number of seconds"):
        load_config(["--persistent-client-expiration", text])


def test_the_tls_and_access_settings_are_checked_together() -> None:
    config = load_config(["--tls-listen", "0.0.0.0", "--certfile", "s.crt", "--keyfile", "s.key"])
    assert config.tls_listen == HostPort("0.0.0.0", 8883), "a host alone means port 8883"
    assert config.listeners == [HostPort("127.0.0.1", 1883), HostPort("0.0.0.0", 8883)]
    assert load_config(["--listen", "none", "--tls-listen", "[::1]:9883", "--certfile", "c", "--keyfile", "k"]
                       ).mqtt_address == HostPort("::1", 9883)
    assert load_config(["--allow-anonymous", "yes"]).allow_anonymous is True
    assert load_config([]).allow_anonymous is None and load_config([]).auto_create_queues is True
    for argv, message in [
        (["--tls-listen", "127.0.0.1:8883"], "--tls-listen needs --certfile and --keyfile"),
        (["--listen", "none"], "--listen none: with no --tls-listen either"),
        (["--tls-listen", "h", "--certfile", "c", "--keyfile", "k", "--require-certificate", "true"],
         "--require-certificate needs --cafile"),
        (["--use-identity-as-username", "true"], "--use-identity-as-username needs --require-certificate"),
        (["--allow-anonymous", "maybe"], "--allow-anonymous: expected true or false, got 'maybe'"),
        (["--max-queues", "-1"], "--max-queues: expected a whole number"),
        (["--etcd-certfile", "c.crt"], "--etcd-certfile and --etcd-keyfile go together"),
        (["--etcd-password-file", "pw"], "--etcd-password-file needs --etcd-user"),
        (["--cluster-certfile", "n1.crt"], "--cluster-certfile, --cluster-keyfile and --cluster-cafile go together"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(argv)
        assert str(info.value).startswith(message), (argv, str(info.value))
