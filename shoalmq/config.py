"""The broker's configuration: one typed ``Config``, read from a YAML file and overridden by flags.

Every setting is declared once in ``OPTIONS``: its YAML key, its flag, its default and how it is parsed.
The command line is built from that table, so every flag has a config key and the two can't drift.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from shoalmq.errors import ConfigError, os_error_text
from shoalmq.queue.config import CLUSTER_REPLICATION_FACTOR, MAX_REPLICATION_FACTOR, QueueConfig, queue_config_from_mapping, queue_configs_from_mapping

LOG_LEVELS = ("debug", "info", "warning", "error")
SYNC_MODES = ("fsync", "async")
ROUTING_MODES = ("proxy", "direct")
#: The partition assigners (shoalmq.cluster.assignment.ASSIGNERS; named here so that reading a configuration
#: loads no cluster code).
ASSIGNER_NAMES = ("hash", "rendezvous")
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclasses.dataclass(frozen=True)
class HostPort:
    """A TCP endpoint, written ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: Any) -> HostPort:
        if not isinstance(text, str):
            raise ValueError(f"expected HOST:PORT as a string, got {text!r}")
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise ValueError(f"write an IPv6 address in brackets, as [{host}]:{port_text}")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"port must be a number from 1 to 65535, got {port_text!r}")
        return cls(host, int(port_text))


def _choice_parser(choices: tuple[str, ...], *, any_case: bool = False) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = value.lower() if any_case and isinstance(value, str) else value
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _int_parser(low: int, high: int, power_of_two: bool = False) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {value!r}")
        if power_of_two and value & (value - 1):
            raise ValueError(f"expected a power of two, got {value}")
        return value

    return parse


#: Units a size may be written with (binary multiples only: "MB" would leave 10**6 or 2**20 to guess).
SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
SIZE_PATTERN = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")


def _size_parser(low: int, high: int) -> Callable[[Any], int]:
    """A number of bytes: a whole number, or one with a unit (``8MiB``, ``256 MiB``, ``1GiB``; any case)."""
    def parse(value: Any) -> int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and (match := SIZE_PATTERN.fullmatch(value)):
            unit = SIZE_UNITS.get(match[2].lower())
            if unit is None:
                raise ValueError(f"expected a number of bytes, optionally with a unit (KiB, MiB, GiB, TiB), "
                                 f"got {value!r}")
            number = int(match[1]) * unit
        if number is None or not low <= number <= high:
            raise ValueError(f"expected a number of bytes from {low} to {high} (KiB, MiB, GiB, TiB allowed), "
                             f"got {value!r}")
        return number

    return parse


#: mosquitto's units of ``persistent_client_expiration``: hours, days, weeks, months (30 days), years (365 days).
DURATION_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}


def _parse_expiration(value: Any) -> int:
    """Seconds, from a whole number of seconds or mosquitto's ``<n>h|d|w|m|y``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit() and int(text) > 0:
            return int(text)
        if text[:-1].isdigit() and int(text[:-1]) > 0 and text[-1:] in DURATION_UNITS:
            return int(text[:-1]) * DURATION_UNITS[text[-1]]
    raise ValueError(f"expected a number of seconds or a duration like 2h, 1d, 1w, 1m (30 days), 1y, got {value!r}")


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A parser for a setting whose absence (None, or an empty string) means "not set"."""
    def parse_optional(value: Any) -> Any:
        return None if value is None or value == "" else parse(value)

    return parse_optional


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_listen(value: Any) -> HostPort | None:
    """``HOST:PORT``, or ``none`` for no plain listener."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return HostPort.parse(value)


def _parse_tls_listen(value: Any) -> HostPort | None:
    """``HOST:PORT``, or ``HOST`` alone for port 8883, or ``none``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if isinstance(value, str):
        text = value.strip()
        _, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or (text.startswith("[") and text.endswith("]")):
            value = f"{text}:8883"  # a host (or a bracketed IPv6 address) alone
    return HostPort.parse(value)


def base_url(address: str) -> str:
    """The URL of a node's HTTP server from its address as registered (``host:port``, or ``https://host:port``
    when it serves HTTPS)."""
    return address if "://" in address else f"http://{address}"


def _parse_http_listen(value: Any) -> HostPort | None:
    """``HOST:PORT`` (port 0: any free one, logged at start), or ``none`` for no HTTP server."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if isinstance(value, str) and value.endswith(":0"):
        return HostPort(HostPort.parse(value[:-1] + "1").host, 0)
    return HostPort.parse(value)


def _parse_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"expected 1-64 letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _parse_endpoints(value: Any) -> tuple[str, ...]:
    from shoalmq.cluster.etcd import parse_endpoints
    if not isinstance(value, str):
        raise ValueError(f"expected a comma-separated list of http://HOST:PORT, got {value!r}")
    return tuple(parse_endpoints(value))


def _parse_host(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in " /[]"):
        raise ValueError(f"expected a host name or address, got {value!r}")
    return value


def _parse_path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path, got {value!r}")
    return Path(value)


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its YAML key (also the ``Config`` field), its flag, default, parser and help."""

    key: str
    flag: str
    default: Any
    parse: Callable[[Any], Any]
    metavar: str
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("listen", "--listen", "127.0.0.1:1883", _parse_listen, "HOST:PORT",
           "address for MQTT over TCP (none: no plain listener)"),
    Option("data_dir", "--data-dir", "./data", _parse_path, "PATH",
           "directory for the node's durable state (created if missing; one broker per directory)"),
    Option("log_level", "--log-level", "info", _choice_parser(LOG_LEVELS, any_case=True), "LEVEL",
           f"log verbosity: {', '.join(LOG_LEVELS)}"),
    Option("sync", "--sync", "fsync", _choice_parser(SYNC_MODES), "MODE",
           "fsync: acknowledge a queued message once its commit is synced to disk; "
           "async: acknowledge at once, commit within the flush interval (a crash may lose that interval)"),
    Option("batch_size", "--batch-size", 500, _int_parser(1, 100_000), "N",
           "most messages of one partition per segment written by a commit"),
    Option("flush_interval_ms", "--flush-interval-ms", 10, _int_parser(0, 60_000), "MS",
           "with --sync async, the longest a message waits before its commit starts"),
    Option("ring_capacity", "--ring-capacity", 16384, _int_parser(2, 1 << 24, power_of_two=True), "N",
           "ready messages each partition keeps in memory (a power of two); the rest wait on disk"),
    Option("ring_bytes", "--ring-bytes", "8MiB", _size_parser(1, 1 << 40), "BYTES",
           "most bytes of ready messages each partition keeps in memory (a number, or with KiB, MiB, GiB); "
           "the rest wait on disk"),
    Option("memory_budget", "--memory-budget", "256MiB", _size_parser(1, 1 << 50), "BYTES",
           "most bytes of ready messages all partitions of the node keep in memory together; the rest wait on disk"),
    Option("consumer_window", "--consumer-window", 128, _int_parser(1, 65535), "N",
           "most unacknowledged $queue/ messages a consumer holds"),
    Option("connect_timeout", "--connect-timeout", 10, _int_parser(1, 3600), "SECONDS",
           "a new connection that sends no CONNECT within this time is closed"),
    Option("max_packet_size", "--max-packet-size", 1 << 20, _int_parser(64, 268_435_455), "BYTES",
           "largest MQTT packet accepted; a larger one closes the connection"),
    Option("max_inflight_messages", "--max-inflight-messages", 20, _int_parser(1, 65535), "N",
           "QoS 1 and 2 messages of ordinary topics in flight to one client at a time"),
    Option("max_queued_messages", "--max-queued-messages", 1000, _int_parser(0, 1 << 31), "N",
           "messages of ordinary topics queued for one client beyond those in flight, or while it is away with a "
           "persistent session; more are dropped and counted (0: no limit)"),
    Option("max_queued_bytes", "--max-queued-bytes", 0, _size_parser(0, 1 << 50), "BYTES",
           "payload bytes queued for one client, as max_queued_messages (0: no limit)"),
    Option("persistent_client_expiration", "--persistent-client-expiration", None, _optional(_parse_expiration),
           "DURATION", "forget a persistent session whose client has been away this long (seconds, or mosquitto's "
           "2h, 1d, 1w, 1m, 1y; not set: keep it until the broker stops)"),
    Option("etcd", "--etcd", None, _optional(_parse_endpoints), "URLS",
           "join a cluster coordinated by these etcd endpoints (comma-separated http://HOST:PORT, tried in turn); "
           "not set: a single node that needs nothing else"),
    Option("node_id", "--node-id", None, _optional(_parse_name), "ID",
           "this node's id in the cluster, unique among live nodes (not set: the host name)"),
    Option("cluster", "--cluster", "shoalmq", _parse_name, "NAME",
           "the cluster's name: the prefix of its keys in etcd"),
    Option("advertise", "--advertise", None, _optional(_parse_host), "HOST",
           "the host other nodes and clients use to reach this node (not set: the host of --listen)"),
    Option("grpc_listen", "--grpc-listen", None, _optional(HostPort.parse), "HOST:PORT",
           "address for the gRPC traffic between nodes (not set: the host of --listen, a port the system picks)"),
    Option("routing", "--routing", "proxy", _choice_parser(ROUTING_MODES), "MODE",
           "proxy: a consumer on any node gets messages from every partition; "
           "direct: a node delivers only the partitions it owns (consumers connect to every node)"),
    Option("lease_ttl", "--lease-ttl", 5, _int_parser(2, 60), "SECONDS",
           "TTL of the node's etcd lease: a crashed node's partitions move to the others this long after"),
    Option("replication_factor", "--replication-factor", None, _optional(_int_parser(1, MAX_REPLICATION_FACTOR)),
           "N", "copies of each partition, on different nodes, of every queue created from now on whose settings give "
           "no replication_factor (default: 3 with --etcd, capped at the live nodes; 1 on a single node)"),
    Option("assigner", "--assigner", "hash", _choice_parser(ASSIGNER_NAMES), "NAME",
           "how partitions are placed on nodes: hash (leader at (p + hash(queue)) mod N, followers the next "
           "nodes), rendezvous (rendezvous hashing with bounded load: a join or leave moves about 1/N)"),
    Option("tls_listen", "--tls-listen", None, _parse_tls_listen, "HOST:PORT",
           "address for MQTT over TLS (HOST alone: port 8883; needs certfile and keyfile; not set: none)"),
    Option("certfile", "--certfile", None, _optional(_parse_path), "PATH",
           "the TLS listener's certificate chain (PEM)"),
    Option("keyfile", "--keyfile", None, _optional(_parse_path), "PATH", "the TLS listener's private key (PEM)"),
    Option("cafile", "--cafile", None, _optional(_parse_path), "PATH",
           "CA certificates (PEM) that client certificates must be signed by"),
    Option("require_certificate", "--require-certificate", False, _parse_bool, "BOOL",
           "TLS clients must present a certificate signed by cafile"),
    Option("use_identity_as_username", "--use-identity-as-username", False, _parse_bool, "BOOL",
           "a TLS client's certificate common name is its username (no password is checked; needs "
           "require_certificate)"),
    Option("password_file", "--password-file", None, _optional(_parse_path), "PATH",
           "users and password hashes in mosquitto's format (as mosquitto_passwd writes them); re-read on SIGHUP"),
    Option("acl_file", "--acl-file", None, _optional(_parse_path), "PATH",
           "topic access rules in mosquitto's ACL format, for ordinary topics and $queue/ alike; re-read on SIGHUP"),
    Option("allow_anonymous", "--allow-anonymous", None, _optional(_parse_bool), "BOOL",
           "clients without a username may connect (not set: only when no password_file or client certificate "
           "identity is configured, and then the broker listens on loopback only)"),
    Option("cluster_certfile", "--cluster-certfile", None, _optional(_parse_path), "PATH",
           "this node's certificate for the gRPC traffic between nodes (PEM; its common name is the node id, its "
           "subject alternative names the address peers dial)"),
    Option("cluster_keyfile", "--cluster-keyfile", None, _optional(_parse_path), "PATH",
           "the private key of --cluster-certfile (PEM)"),
    Option("cluster_cafile", "--cluster-cafile", None, _optional(_parse_path), "PATH",
           "the cluster CA (PEM): peers must present a certificate it signed"),
    Option("etcd_cafile", "--etcd-cafile", None, _optional(_parse_path), "PATH",
           "CA (PEM) that etcd's certificate is verified with (https:// endpoints)"),
    Option("etcd_certfile", "--etcd-certfile", None, _optional(_parse_path), "PATH",
           "client certificate (PEM) presented to etcd"),
    Option("etcd_keyfile", "--etcd-keyfile", None, _optional(_parse_path), "PATH",
           "the private key of --etcd-certfile (PEM)"),
    Option("etcd_user", "--etcd-user", None, _optional(_parse_name), "NAME",
           "etcd user the node authenticates as (its password: --etcd-password-file, or the environment variable "
           "SHOALMQ_ETCD_PASSWORD)"),
    Option("etcd_password_file", "--etcd-password-file", None, _optional(_parse_path), "PATH",
           "a file holding the etcd user's password (its first line)"),
    Option("auto_create_queues", "--auto-create-queues", True, _parse_bool, "BOOL",
           "a publish or subscription to an unknown queue creates it (false: only queues in the configuration or "
           "already stored exist)"),
    Option("max_queues", "--max-queues", 0, _int_parser(0, 1 << 31), "N",
           "most queues this node holds; one more is not created on first use (0: no limit)"),
    Option("http_listen", "--http-listen", "127.0.0.1:18883", _parse_http_listen, "HOST:PORT",
           "address of the HTTP server: /metrics, the JSON API, the dashboard (none: no HTTP server; port 0: "
           "any free port)"),
    Option("http_token_file", "--http-token-file", None, _optional(_parse_path), "PATH",
           "a file holding a bearer token (its first line) that the HTTP API accepts, also for administration"),
    Option("http_certfile", "--http-certfile", None, _optional(_parse_path), "PATH",
           "certificate chain (PEM) of the HTTP server: it then serves HTTPS only"),
    Option("http_keyfile", "--http-keyfile", None, _optional(_parse_path), "PATH",
           "the private key (PEM) of --http-certfile"),
    Option("sys_interval", "--sys-interval", 10, _int_parser(0, 3600), "SECONDS",
           "seconds between updates of the $SYS topics (0: none)"),
)

#: Settings only the configuration file can give (nested mappings): key -> parser of the raw value.
FILE_SECTIONS: dict[str, Callable[[Any], Any]] = {
    "queues": queue_configs_from_mapping,
    "queue_defaults": queue_config_from_mapping,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """The broker's effective configuration (defaults, then the config file, then flags)."""

    listen: HostPort | None = HostPort.parse("127.0.0.1:1883")
    data_dir: Path = Path("./data")
    log_level: str = "info"
    sync: str = "fsync"
    batch_size: int = 500
    flush_interval_ms: int = 10
    ring_capacity: int = 16384
    ring_bytes: int = 8 << 20
    memory_budget: int = 256 << 20
    consumer_window: int = 128
    connect_timeout: int = 10
    max_packet_size: int = 1 << 20
    max_inflight_messages: int = 20
    max_queued_messages: int = 1000
    max_queued_bytes: int = 0
    persistent_client_expiration: int | None = None
    etcd: tuple[str, ...] | None = None
    node_id: str | None = None
    cluster: str = "shoalmq"
    advertise: str | None = None
    grpc_listen: HostPort | None = None
    routing: str = "proxy"
    lease_ttl: int = 5
    #: --replication-factor, folded into ``queue_defaults`` (None: as the defaults say).
    replication_factor: int | None = None
    assigner: str = "hash"
    tls_listen: HostPort | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    cafile: Path | None = None
    require_certificate: bool = False
    use_identity_as_username: bool = False
    password_file: Path | None = None
    acl_file: Path | None = None
    allow_anonymous: bool | None = None
    cluster_certfile: Path | None = None
    cluster_keyfile: Path | None = None
    cluster_cafile: Path | None = None
    etcd_cafile: Path | None = None
    etcd_certfile: Path | None = None
    etcd_keyfile: Path | None = None
    etcd_user: str | None = None
    etcd_password_file: Path | None = None
    auto_create_queues: bool = True
    max_queues: int = 0
    http_listen: HostPort | None = HostPort.parse("127.0.0.1:18883")
    http_token_file: Path | None = None
    http_certfile: Path | None = None
    http_keyfile: Path | None = None
    sys_interval: int = 10
    #: Queues declared in the configuration file (others are created on first use with ``queue_defaults``).
    queues: Mapping[str, QueueConfig] = dataclasses.field(default_factory=dict)
    queue_defaults: QueueConfig = QueueConfig(replication_factor=1)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]

    @property
    def listeners(self) -> list[HostPort]:
        return [address for address in (self.listen, self.tls_listen) if address is not None]

    @property
    def mqtt_address(self) -> HostPort:
        """The listener other nodes advertise to clients: the plain one, else the TLS one."""
        address = self.listen or self.tls_listen
        assert address is not None
        return address


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping of option keys to raw values; ConfigError if it can't."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {os_error_text(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
    known = {o.key for o in OPTIONS} | set(FILE_SECTIONS)
    for key in data:
        if key not in known:
            hint = f" (did you mean {key.replace('-', '_')!r}?)" if str(key).replace("-", "_") in known else ""
            raise ConfigError(f"config file {path}: unknown setting {key!r}{hint}")
    return data


def build_config(file_values: Mapping[str, Any] | None = None,
                 flag_values: Mapping[str, Any] | None = None,
                 source: str = "config file") -> Config:
    """Merge defaults, file values and flag values (flags win) into a validated ``Config``."""
    file_values = file_values or {}
    flag_values = flag_values or {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if flag_values.get(option.key) is not None:
            raw, origin = flag_values[option.key], option.flag
        elif option.key in file_values:
            raw, origin = file_values[option.key], f"{source}: {option.key}"
        else:
            raw, origin = option.default, f"default {option.key}"
        try:
            values[option.key] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    for key, parse in FILE_SECTIONS.items():
        if key in file_values:
            try:
                values[key] = parse(file_values[key])
            except ConfigError as exc:
                raise ConfigError(f"{source}: {key}: {exc}") from None
    # The replication factor of queues whose settings give none: the flag's, else 3 in a cluster, 1 alone.
    factor = values.get("replication_factor") or (CLUSTER_REPLICATION_FACTOR if values.get("etcd") else 1)
    try:
        defaults = values.get("queue_defaults", QueueConfig())
        if not defaults.replication_factor:
            values["queue_defaults"] = dataclasses.replace(defaults, replication_factor=factor)
        values["queues"] = {name: queue if queue.replication_factor else
                            dataclasses.replace(queue, replication_factor=factor)
                            for name, queue in values.get("queues", {}).items()}
    except ConfigError as exc:
        raise ConfigError(f"--replication-factor: {exc}") from None
    _fit_payloads(values, file_values)
    _check_tls(values)
    return Config(**values)


def _check_tls(values: dict[str, Any]) -> None:
    """The listeners and their TLS settings must make sense together."""
    if values.get("listen") is None and values.get("tls_listen") is None:
        raise ConfigError("--listen none: with no --tls-listen either, the broker would accept no client")
    if values.get("tls_listen") is not None and (values.get("certfile") is None or values.get("keyfile") is None):
        raise ConfigError("--tls-listen needs --certfile and --keyfile")
    if (values.get("http_certfile") is None) != (values.get("http_keyfile") is None):
        raise ConfigError("--http-certfile and --http-keyfile go together (HTTPS needs both)")
    if values.get("require_certificate") and values.get("cafile") is None:
        raise ConfigError("--require-certificate needs --cafile (the CA that signs client certificates)")
    if values.get("require_certificate") and values.get("tls_listen") is None:
        raise ConfigError("--require-certificate needs --tls-listen")
    if values.get("use_identity_as_username") and not values.get("require_certificate"):
        raise ConfigError("--use-identity-as-username needs --require-certificate")
    if (values.get("etcd_certfile") is None) != (values.get("etcd_keyfile") is None):
        raise ConfigError("--etcd-certfile and --etcd-keyfile go together")
    if values.get("etcd_password_file") is not None and values.get("etcd_user") is None:
        raise ConfigError("--etcd-password-file needs --etcd-user")
    cluster_tls = [values.get(k) is not None for k in ("cluster_certfile", "cluster_keyfile", "cluster_cafile")]
    if any(cluster_tls) and not all(cluster_tls):
        raise ConfigError("--cluster-certfile, --cluster-keyfile and --cluster-cafile go together")


def publish_size(topic: str, payload: int) -> int:
    """Bytes of a QoS 1 PUBLISH of ``payload`` bytes to ``topic``, fixed header included."""
    remaining = 2 + len(topic.encode()) + 2 + payload
    # (the remaining length's own bytes, computed here: importing shoalmq._native would load numpy)
    return 1 + max(1, (remaining.bit_length() + 6) // 7) + remaining


def _fit_payloads(values: dict[str, Any], file_values: Mapping[str, Any]) -> None:
    """A queue's ``max_payload`` must fit in a packet, or a publish the queue would take is refused as an oversize
    packet before the queue sees it. One set in the file that does not fit is refused; the default one (256 KiB)
    is lowered to what ``max_packet_size`` allows."""
    limit = values.get("max_packet_size", Config.max_packet_size)
    declared = file_values.get("queues") if isinstance(file_values.get("queues"), Mapping) else {}
    defaults_raw = file_values.get("queue_defaults")
    checks = [("queue_defaults", "$queue/q", values.get("queue_defaults", QueueConfig()),  # (the shortest topic)
               isinstance(defaults_raw, Mapping) and "max_payload" in defaults_raw)]
    checks += [(f"queue {name!r}", f"$queue/{name}", queue,
                isinstance(declared.get(name), Mapping) and "max_payload" in declared[name])
               for name, queue in values.get("queues", {}).items()]
    for what, topic, queue, explicit in checks:
        size = publish_size(topic, queue.max_payload)
        if size <= limit:
            continue
        if explicit:
            raise ConfigError(f"{what}: max_payload {queue.max_payload:,} does not fit in max_packet_size {limit:,} "
                              f"(a PUBLISH to {topic} carries at least {size - queue.max_payload} bytes more): raise "
                              "max_packet_size or lower max_payload")
        payload = max(limit - (size - queue.max_payload), 0)
        while payload and publish_size(topic, payload) > limit:
            payload -= 1
        fitted = dataclasses.replace(queue, max_payload=payload)
        if what == "queue_defaults":
            values["queue_defaults"] = fitted
        else:
            values["queues"] = {**values["queues"], topic[7:]: fitted}
