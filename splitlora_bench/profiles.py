"""Modeled wall time from device profiles: compute = FLOPs / throughput, transfer = bytes / link rate.

Per method, for R rounds of S steps per client and N clients in parallel:

- CenLoRA: one device does every step of all data: R*N*S * F_full / flops(centralized_on).
- FedLoRA: each round, every client does S whole-model steps on its device, then uploads and downloads the
  whole-model adapter: R * (S * F_full / client + 2 * A_full / link).
- SplitLoRA: a client step is client compute + activations up + server compute + gradient down, and the server
  serves all N clients: step = max(F_c / client + (up + down) / link + F_s / server, N * F_s / server);
  a round is S steps plus the client adapter up and down: R * (S * step + 2 * A_client / link).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from common.config.engine import ConfigError


@dataclass(frozen=True)
class Profile:
    """Sustained FLOP/s of a client and of the server, and each client's link rate (each way)."""

    name: str
    client_flops: float
    server_flops: float
    link_mbit: float
    centralized_on: str = "client"

    @property
    def link_bytes_per_s(self) -> float:
        """Link rate in bytes per second."""
        return self.link_mbit * 1e6 / 8

    @property
    def centralized_flops(self) -> float:
        """Throughput of the device CenLoRA runs on."""
        return self.client_flops if self.centralized_on == "client" else self.server_flops


def load_profiles(path: str | Path) -> list[Profile]:
    """Every profile of a YAML file `profiles: {name: {client_flops, server_flops, link_mbit, centralized_on}}`."""
    try:
        data = yaml.safe_load(Path(path).read_text())["profiles"]
        profiles = [Profile(name, float(p["client_flops"]), float(p["server_flops"]), float(p["link_mbit"]),
                            str(p.get("centralized_on", "client"))) for name, p in data.items()]
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"profiles file {path}: {err!r}") from err
    if any(p.centralized_on not in ("client", "server") for p in profiles):
        raise ConfigError(f"profiles file {path}: centralized_on must be client or server")
    return profiles


def cenlora_seconds(p: Profile, steps: int, full_flops: int) -> float:
    """Modeled time of `steps` whole-model steps on one device."""
    return steps * full_flops / p.centralized_flops


def fedlora_round_seconds(p: Profile, local_steps: int, full_flops: int, adapter_bytes: int) -> float:
    """Modeled time of one FedLoRA round (clients in parallel)."""
    return local_steps * full_flops / p.client_flops + 2 * adapter_bytes / p.link_bytes_per_s


def splitlora_step_seconds(p: Profile, clients: int, client_flops: int, server_flops: int,
                           bytes_up: float, bytes_down: float) -> float:
    """Modeled time of one step of every client (clients in parallel, one shared server)."""
    own = client_flops / p.client_flops + (bytes_up + bytes_down) / p.link_bytes_per_s + server_flops / p.server_flops
    return max(own, clients * server_flops / p.server_flops)


def splitlora_round_seconds(p: Profile, clients: int, local_steps: int, client_flops: int, server_flops: int,
                            bytes_up: float, bytes_down: float, adapter_bytes: int) -> float:
    """Modeled time of one SplitLoRA round."""
    step = splitlora_step_seconds(p, clients, client_flops, server_flops, bytes_up, bytes_down)
    return local_steps * step + 2 * adapter_bytes / p.link_bytes_per_s
