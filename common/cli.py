"""Command-line plumbing both roles use: sub-commands from config dataclasses, logging, error exits."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from common.config.engine import ConfigError, add_arguments, format_config, resolve
from common.logs import LOG_FORMATS, setup_logging

log = logging.getLogger("splitlora")


def add_command(subparsers, name: str, cls: type, run: Callable[[object], int], help: str,
                log_level: str = "INFO") -> argparse.ArgumentParser:
    """Add a sub-command whose options are the fields of `cls` plus --config, --log-level and --log-format;
    return its parser."""
    parser = subparsers.add_parser(name, help=help, description=(cls.__doc__ or help).strip())
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML file with any of these options (flags win)")
    parser.add_argument("--log-level", default=log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help=f"logging verbosity (default: {log_level})")
    parser.add_argument("--log-format", default="text", choices=list(LOG_FORMATS),
                        help="log lines as text or as JSON objects (with client and round when known) "
                             "(default: text)")
    add_arguments(parser, cls)
    parser.set_defaults(_config_cls=cls, _run=run)
    return parser


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, resolve the config, log it, run the command; turn expected errors into one clear line."""
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    setup_logging(args.log_level, args.log_format)
    try:
        config = resolve(args._config_cls, args, args.config)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: config error: {err}\n")
    log.info("effective config\n%s", format_config(config))
    try:
        return int(args._run(config) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ConnectionError) as err:  # user-facing failures: no stack trace
        log.debug("failed", exc_info=True)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
