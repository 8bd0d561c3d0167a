"""The package layout: shoalmq's subpackages must never shadow the standard library's ``queue`` and ``cmd``."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import shoalmq

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_stdlib_queue_and_cmd_resolve_to_the_standard_library_in_the_test_run() -> None:
    import cmd
    import queue

    assert Path(queue.__file__).resolve().parent == STDLIB
    assert Path(cmd.__file__).resolve().parent == STDLIB
    assert hasattr(queue, "SimpleQueue") and hasattr(cmd, "Cmd")


def test_stdlib_modules_win_with_the_repo_root_first_on_sys_path() -> None:
    # `python -c` from the repo root puts it first on sys.path, as `python -m pytest` does.
    code = "import queue, cmd, logging.handlers, concurrent.futures; print(queue.__file__); print(cmd.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert Path(line).resolve().parent == STDLIB


def test_subpackages_of_the_design_exist() -> None:
    import importlib

    for name in ("broker", "queue", "cluster", "_native", "proto", "cmd"):
        module = importlib.import_module(f"shoalmq.{name}")
        assert Path(module.__file__).resolve().parent == Path(shoalmq.__file__).resolve().parent / name


def test_no_top_level_package_shadows_the_standard_library() -> None:
    stdlib_names = set(sys.stdlib_module_names)
    top_level = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    top_level |= {p.stem for p in ROOT.glob("*.py")}
    assert not top_level & stdlib_names, top_level & stdlib_names


def test_reading_the_configuration_loads_no_storage_engine_nor_grpc() -> None:
    """``broker --help`` and ``broker cluster status`` read the configuration: they must not pay for LMDB,
    numpy, gRPC or amqtt."""
    code = ("import sys, shoalmq.config, shoalmq.cmd.broker; "
            "print(sorted(m for m in ('lmdb', 'numpy', 'grpc', 'amqtt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
