"""The ``broker`` command: parse flags and the config file, then run a node on uvloop."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from shoalmq import __version__
from shoalmq.config import OPTIONS, Config, build_config, read_config_file
from shoalmq.errors import ExitCode, ShoalError

PROG = "broker"

log = logging.getLogger("shoalmq")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROG,
        description="ShoalMQ: an MQTT broker with durable, partitioned $queue/ work queues.",
        epilog="Every flag has a config-file key of the same name with '_' for '-'; flags override the file. "
               "`broker cluster status --etcd URLS` prints a cluster's nodes, partition owners and queue depths; "
               "`broker cluster drain NODE` moves a node's partitions away; `broker queues list|describe|purge|"
               "delete|redrive` administers queues through a node's HTTP API.",
    )
    parser.add_argument("--version", action="version", version=f"ShoalMQ {__version__}")
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    for option in OPTIONS:
        # default=None so that "not given" is distinguishable from "given the default"; the real default is
        # shown in --help through the help text.
        parser.add_argument(option.flag, dest=option.key, metavar=option.metavar, default=None,
                            help=option.help if option.default is None
                            else f"{option.help} (default: {option.default})")
    return parser


def load_config(argv: Sequence[str] | None = None) -> Config:
    """Parse ``argv`` (and the config file it names) into a Config. ConfigError or SystemExit on bad input."""
    args = make_parser().parse_args(argv)
    file_values = read_config_file(args.config) if args.config else {}
    flag_values = {option.key: getattr(args, option.key) for option in OPTIONS}
    return build_config(file_values, flag_values, source=f"config file {args.config}")


def setup_logging(config: Config) -> None:
    """ShoalMQ logs at the configured level; libraries only warn, except amqtt at ``--log-level debug``."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    level = config.log_level_number
    logging.getLogger("shoalmq").setLevel(level)
    logging.getLogger("amqtt").setLevel(level if level == logging.DEBUG else max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["cluster"]:
        from shoalmq.cmd.cluster import main as cluster_main

        return cluster_main(args[1:])
    if args[:1] == ["queues"]:
        from shoalmq.cmd.queues import main as queues_main

        return queues_main(args[1:])
    try:
        config = load_config(argv)
    except ShoalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(config)

    import uvloop  # imported late: `broker --help` should not pay for it

    from shoalmq.node import Node

    try:
        uvloop.run(Node(config).serve())
    except ShoalError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
