"""Health probe over the standard `grpc.health.v1` service of the split server and the aggregator.

`python -m splitlora_server.healthcheck --server HOST:PORT (--insecure | --tls-ca ...)` exits 0 when the
server answers SERVING and 1 otherwise (Docker's HEALTHCHECK convention); `splitlora-server health` is the
same check through the main command line. Imports neither torch nor the model code: it starts in ~0.1 s.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config.engine import ConfigError, add_arguments, option, resolve
from splitlora_server.ops.admin import ConnectOptions, open_channel


@dataclass
class HealthConfig(ConnectOptions):
    """`splitlora-server health`: exit 0 if the server reports SERVING, else 1."""

    service: str = option("", "Service to ask about (e.g. splitlora.v1.SplitTraining); empty: the whole server.")


def check(cfg: HealthConfig) -> tuple[bool, str]:
    """Ask the server's health service; (healthy, one line saying why)."""
    channel = open_channel(cfg)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=cfg.service), timeout=cfg.timeout)
    except grpc.RpcError as err:
        return False, f"{cfg.server}: unhealthy: {err.code().name}: {err.details()}"
    finally:
        channel.close()
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{cfg.server}: {state}"


def run(cfg: HealthConfig) -> int:
    """Print the probe's line; 0 if healthy, 1 if not."""
    healthy, line = check(cfg)
    print(line, flush=True)
    return 0 if healthy else 1


def build_parser() -> argparse.ArgumentParser:
    """The options of `python -m splitlora_server.healthcheck` (those of `splitlora-server health`)."""
    parser = argparse.ArgumentParser(prog="python -m splitlora_server.healthcheck", description=HealthConfig.__doc__)
    add_arguments(parser, HealthConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m splitlora_server.healthcheck`; any failure exits 1."""
    parser = build_parser()
    try:
        cfg = resolve(HealthConfig, parser.parse_args(argv))
    except ConfigError as err:
        print(f"healthcheck: config error: {err}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # argparse; Docker reserves exit code 2
        return 0 if exc.code == 0 else 1
    return run(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
