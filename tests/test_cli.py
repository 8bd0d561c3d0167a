"""The ``broker`` command: help, version, and one clear line on stderr with a distinct exit code for bad input."""

import re
import socket
import subprocess
from pathlib import Path

import pytest

from shoalmq import __version__
from shoalmq.config import OPTIONS
from shoalmq.errors import ExitCode
from tests.support import BIN_DIR, BrokerProcess

ROOT = Path(__file__).resolve().parent.parent
BROKER = str(BIN_DIR / "broker")
# Runtime errors are checked without the INFO lines a broker logs while it starts.
QUIET = ("--log-level", "warning", "--http-listen", "none")


def run_broker(*args: str, cwd: Path | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BROKER, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], code: int, pattern: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]


def test_help_lists_every_flag() -> None:
    result = run_broker("--help")
    assert result.returncode == 0
    for flag in ["--help", "--version", "--config", *(o.flag for o in OPTIONS)]:
        assert flag in result.stdout
    assert "127.0.0.1:1883" in result.stdout and "./data" in result.stdout


def test_version() -> None:
    result = run_broker("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ShoalMQ {__version__}"


@pytest.mark.parametrize("args, pattern", [
    (["--no-such-flag"], r"^broker: error: unrecognized arguments: --no-such-flag \(see broker --help\)$"),
    (["--listen"], r"^broker: error: argument --listen: expected one argument"),
    (["--listen", "nowhere"], r"^broker: error: --listen: expected HOST:PORT, got 'nowhere'$"),
    (["--log-level", "chatty"], r"^broker: error: --log-level: expected one of"),
    (["--config", "/nonexistent/shoal.yaml"], r"^broker: error: cannot read config file /nonexistent/shoal.yaml"),
])
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], pattern: str) -> None:
    assert_one_clear_line(run_broker(*args), ExitCode.USAGE_ERROR, pattern)


def test_bad_config_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text("listen: 127.0.0.1:1884\ncolour: red\n")
    assert_one_clear_line(run_broker("--config", str(path)), ExitCode.USAGE_ERROR, r"unknown setting 'colour'")


def test_address_in_use_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_broker("--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"), *QUIET)
    assert_one_clear_line(result, ExitCode.RUNTIME_ERROR, rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use")


def test_data_dir_that_is_a_file_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = run_broker("--listen", "127.0.0.1:1", "--data-dir", str(not_a_dir), *QUIET)
    assert_one_clear_line(result, ExitCode.RUNTIME_ERROR, r"data directory .*/file: (File exists|Not a directory)")


def test_second_broker_on_the_same_data_dir_is_refused(broker: BrokerProcess) -> None:
    result = run_broker("--listen", "127.0.0.1:1", "--data-dir", str(broker.data_dir), *QUIET)
    assert_one_clear_line(result, ExitCode.RUNTIME_ERROR, rf"data directory .* is in use by process {broker.pid}")
    assert broker.running


def test_every_exit_code_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \| .+\|$", readme, re.MULTILINE), f"exit code {code.value} missing"


def test_every_flag_is_in_the_readme_s_table() -> None:
    from shoalmq.config import OPTIONS

    readme = (ROOT / "README.md").read_text()
    for option in OPTIONS:
        assert re.search(rf"^\| `{re.escape(option.flag)}[ `].*\| `{option.key}` \|", readme, re.MULTILINE), \
            f"{option.flag} ({option.key}) missing from the README's flag table"


def test_help_names_no_default_for_a_setting_that_has_none() -> None:
    result = subprocess.run([str(BIN_DIR / "broker"), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--tls-listen" in result.stdout
    assert "None" not in result.stdout
