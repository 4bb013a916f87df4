"""`splitlora-server status`: what a running split server is doing, as a table (or JSON) for operators."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict

from common.config.engine import ConfigError, option
from common.reach import explain_admin_error
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from splitlora_server.ops.admin import ConnectOptions, open_channel

_COLUMNS = ("client", "connected", "round", "steps", "steps/s", "last loss", "bytes in", "bytes out", "last error")


@dataclass
class StatusConfig(ConnectOptions):
    """`splitlora-server status`: connected clients, round, steps/s, bytes in/out and last error per client."""

    json: bool = option(False, "Print the raw status as one JSON object instead of a table.")
    watch: float = option(0.0, "Print again every this many seconds (with per-client steps/s); 0: once.")

    def validate(self) -> None:
        """The connection checks, and a non-negative interval."""
        super().validate()
        if self.watch < 0:
            raise ConfigError(f"watch must be >= 0, got {self.watch}")


def fetch_status(channel: grpc.Channel, timeout: float) -> spb.StatusReply:
    """One Status call."""
    return sgrpc.SplitTrainingStub(channel).Status(spb.StatusRequest(), timeout=timeout)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def round_text(current: int, rounds: int) -> str:
    """Rounds are numbered from 0 everywhere (logs, metrics, progress bar, status): 'round 1 of 0-4'."""
    if current >= rounds:
        return f"all {rounds} rounds done"
    return f"round {current} of 0-{rounds - 1}"


def format_status(reply: spb.StatusReply, server: str, rates: dict[str, float] | None = None) -> str:
    """The status as a header line and one aligned row per client; `rates`: per-client steps/s, if known."""
    state = "finished" if reply.finished else "training"
    head = (f"server {server}: {state}, {round_text(reply.round, reply.rounds)}, {reply.steps} steps, "
            f"{reply.steps_per_second:.2f} steps/s, server adapter {reply.server_adapter_mode or '-'}, "
            f"{sum(c.connected for c in reply.clients)}/{len(reply.clients)} clients connected")
    more = (f"generation: {reply.generation_sessions} sessions, {human_bytes(reply.generation_cache_bytes)} of "
            f"key/value cache, {reply.generation_tokens} positions computed")
    if reply.validation_round >= 0 and not math.isnan(reply.validation_loss):
        more += f"; validation loss {reply.validation_loss:.4f} after round {reply.validation_round}"
    rows = [_COLUMNS]
    for c in reply.clients:
        rate = (rates or {}).get(c.client_id)
        rows.append((c.client_id, "yes" if c.connected else "no",
                     "done" if c.round >= reply.rounds else str(c.round), str(c.steps),
                     "-" if rate is None else f"{rate:.2f}",
                     "-" if math.isnan(c.last_loss) else f"{c.last_loss:.4f}",
                     human_bytes(c.bytes_in), human_bytes(c.bytes_out), c.last_error or "-"))
    if len(rows) == 1:
        return "\n".join([head, more, "(no client has joined yet)", *_refusal_lines(reply)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join([head, *(line.rstrip() for line in lines), more, *_refusal_lines(reply)])


def _refusal_lines(reply: spb.StatusReply) -> list[str]:
    """Refused calls by caller and reason, and incidents (only when there are any)."""
    lines = [f"refused: {r.caller} {r.reason} x{r.count}" for r in reply.refusals]
    return lines + [f"incident: {text}" for text in reply.incidents]


def status_json(reply: spb.StatusReply) -> str:
    """The status as one JSON object (proto field names)."""
    return json.dumps(MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


def run(cfg: StatusConfig) -> int:
    """Print the status once, or every `cfg.watch` seconds until interrupted; 1 if the server cannot be asked."""
    channel = open_channel(cfg)
    previous: tuple[float, dict[str, int]] | None = None
    try:
        while True:
            try:
                reply = fetch_status(channel, cfg.timeout)
            except grpc.RpcError as err:
                print(f"splitlora-server status: {explain_admin_error(err, 'status', cfg.server, cfg, cfg.timeout)}",
                      file=sys.stderr, flush=True)
                return 1
            now, steps = time.monotonic(), {c.client_id: c.steps for c in reply.clients}
            rates = None
            if previous is not None:
                elapsed = max(now - previous[0], 1e-9)
                rates = {cid: (n - previous[1].get(cid, 0)) / elapsed for cid, n in steps.items()}
            print(status_json(reply) if cfg.json else format_status(reply, cfg.server, rates), flush=True)
            if not cfg.watch:
                return 0
            previous = (now, steps)
            time.sleep(cfg.watch)
            if not cfg.json:
                print(flush=True)
    finally:
        channel.close()
