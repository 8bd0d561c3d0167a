"""The load tool (``python -m bench.loadtool``) against a real ``mosquitto`` broker, and its error handling.

The tool runs as a subprocess, the way it is used; its figures are read back from its ``--json`` file. Nothing here
checks speed: only that every message is accounted for and the figures are there and sane.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
# Debian installs the broker in /usr/sbin, which is not on every user's PATH.
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")


def run_loadtool(*args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.loadtool", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


class MosquittoProcess(ManagedProcess):
    """Debian's ``mosquitto`` on a free loopback port, ready once it accepts a TCP connection."""

    name = "mosquitto"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # mosquitto drops QoS 1 messages beyond 1,000 queued for one client by default; a consumer that falls
            # behind for a moment would then see "lost" messages that are mosquitto's policy, not a fault.
            "max_queued_messages 0\n"
        )

    def command(self) -> list[str]:
        assert MOSQUITTO is not None
        return [MOSQUITTO, "-c", str(self.config)]

    def is_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    if MOSQUITTO is None:
        pytest.fail("the `mosquitto` broker is not installed (Debian package `mosquitto`): run `make test`, "
                    "which installs it")
    broker = MosquittoProcess(tmp_path / "mosquitto")
    broker.start(timeout=15)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.timeout(120)
def test_shared_subscription_run_accounts_for_every_message(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    messages = 20_000
    result = run_loadtool(
        "--port", str(mosquitto.port), "--publishers", "2", "--consumers", "2", "--messages", str(messages),
        "--size", "100", "--topic", "bench/t", "--sub-topic", "$share/g/bench/t", "--client-prefix", "t",
        "--broker-pid", str(mosquitto.pid), "--json", str(report_path),
    )
    assert result.returncode == 0, (result.stdout, result.stderr, mosquitto.log)
    assert "Traceback" not in result.stderr
    report = json.loads(report_path.read_text())

    assert report["published"] == messages
    assert report["acked"] == messages, "every published message PUBACKed"
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert report["delivered"] == report["published"]
    assert report["delivered_unique"] == messages
    assert report["foreign"] == 0
    for key in ("latency_p50_ms", "latency_p99_ms", "latency_max_ms", "published_per_s", "delivered_per_s"):
        value = report[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert report["latency_p50_ms"] <= report["latency_p99_ms"] <= report["latency_max_ms"]
    assert isinstance(report["broker_cpu_per_100k"], (int, float)) and report["broker_cpu_per_100k"] > 0
    assert report["broker_cpu_seconds"] > 0

    # The human-readable table carries the same figures.
    assert "published/s" in result.stdout and "latency p99" in result.stdout
    assert "broker CPU / 100K" in result.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker_kind", ["mosquitto", "shoalmq"])
def test_a_fan_out_run_counts_every_consumer_s_copy(broker_kind: str, mosquitto: MosquittoProcess,
                                                    broker_factory, tmp_path: Path) -> None:
    broker = mosquitto if broker_kind == "mosquitto" else broker_factory()
    report_path = tmp_path / "fan.json"
    messages = 3_000
    result = run_loadtool(
        "--port", str(broker.port), "--publishers", "1", "--consumers", "3", "--messages", str(messages),
        "--size", "100", "--topic", "fan/t", "--sub-topic", "fan/t", "--fan-out", "--client-prefix", "f",
        "--json", str(report_path),
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    report = json.loads(report_path.read_text())
    assert report["fan_out"] is True and report["acked"] == messages
    assert report["delivered"] == report["delivered_unique"] == 3 * messages, "every consumer got every message"
    assert report["lost"] == 0 and report["duplicates"] == 0


def test_a_paced_run_sends_no_faster_than_the_rate(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """``--rate`` paces the publishers (message i is due at i / rate s): the run cannot end before its schedule."""
    report_path = tmp_path / "paced.json"
    result = run_loadtool("--port", str(mosquitto.port), "--messages", "1000", "--rate", "2000",
                          "--topic", "bench/paced", "--client-prefix", "paced", "--json", str(report_path))
    assert result.returncode == 0, (result.stdout, result.stderr)
    report = json.loads(report_path.read_text())
    assert report["acked"] == 1000 and report["lost"] == 0 and report["rate"] == 2000
    assert report["publish_seconds"] >= 999 / 2000  # the last message was due at 0.4995 s


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, mentions", [
    (("--port", "1883", "--bogus"), "--bogus"),
    (("--port", "1883", "--publishers", "0"), "--publishers"),
    (("--port", "1883", "--size", "10"), "--size"),
    (("--messages", "10"), "--port"),
])
def test_bad_flag_is_one_line_and_exit_code_2(args: tuple[str, ...], mentions: str) -> None:
    result = run_loadtool(*args, timeout=30)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("loadtool: error:") and mentions in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.timeout(120)
def test_closed_port_fails_with_one_line_within_the_connect_timeout() -> None:
    port = free_port()  # handed out by the kernel and closed again: nothing listens there
    connect_timeout = 5.0
    started = time.monotonic()
    result = run_loadtool("--port", str(port), "--publishers", "2", "--consumers", "2",
                          "--connect-timeout", str(connect_timeout), timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert "cannot connect" in lines[0] and f"127.0.0.1:{port}" in lines[0], lines[0]
    assert elapsed < connect_timeout, f"took {elapsed:.1f} s"

