"""Helpers for the compose tests: which parser checks a command, and whether issue 4's flags exist yet."""
from __future__ import annotations

import argparse
import contextlib
import functools
import io

from splitlora_client import healthcheck as client_health
from splitlora_client.cli import build_parser as client_parser
from splitlora_server import healthcheck as server_health
from splitlora_server.cli import build_parser as server_parser
from splitlora_server.cli import main as server_main

# flags that arrive with issue 4 (TLS/mTLS); the real compose file uses them
TLS_VALUE_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")
TLS_SWITCHES = ("--require-client-cert", "--insecure")


@functools.lru_cache(maxsize=None)
def certs_command_available() -> bool:
    """`splitlora-server certs --help` works (issue 4 merged)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            server_main(["certs", "--help"])
        except SystemExit as exc:
            return exc.code == 0
    return False


def parser_for(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The argument parser that checks a service command, and the arguments it parses."""
    programs = {"splitlora-server": server_parser, "splitlora-client": client_parser}
    modules = {"splitlora_server.healthcheck": server_health.build_parser,
               "splitlora_client.healthcheck": client_health.build_parser}
    if argv and argv[0] in programs:
        return programs[argv[0]](), argv[1:]
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m" and argv[2] in modules:
        return modules[argv[2]](), argv[3:]
    raise AssertionError(f"no known parser for {argv[:3]}")


def parse_errors(argv: list[str]) -> str:
    """'' if the command line parses, else argparse's message."""
    parser, args = parser_for(argv)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            return err.getvalue().strip() or f"exit {exc.code}"
    return ""


def uses_tls_flags(argv: list[str]) -> bool:
    """Whether a server/client command needs issue 4 (certs, or TLS flags of serve/aggregate/train)."""
    if argv[:1] not in (["splitlora-server"], ["splitlora-client"]):
        return False  # the health probes have their TLS options already
    return argv[1:2] == ["certs"] or any(a in TLS_VALUE_FLAGS + TLS_SWITCHES for a in argv)


def without_tls_flags(argv: list[str]) -> list[str]:
    """The command with issue 4's flags (and their values) taken out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in TLS_VALUE_FLAGS:
            skip = True
        elif arg not in TLS_SWITCHES:
            out.append(arg)
    return out
