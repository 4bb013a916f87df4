"""Real processes through the console scripts, for the fault tests: start, kill on cue, restart, compare results.

A `Role` is one server, aggregator or client. Each incarnation but the last gets one `SPLITLORA_FAULT` entry
(see common.faults), dies of SIGKILL at that point, and is restarted by `run_all` with the same arguments (and
the same port), exactly like a supervisor restarting a crashed service. Ports are picked up front so that every
process of a run can start at once (process start-up, mostly imports, is what these tests spend time on).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from splitlora_bench.procs import BIN, free_port  # noqa: F401 (free_port: for the fault tests)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# a tiny schedule: 2 clients x 3 rounds x 2 local steps; per-client server adapters so that the result does not
# depend on how the two clients' steps interleave (see the README on determinism)
ROUNDS = 3
TRAINING = ["--rounds", str(ROUNDS), "--local-steps", "2", "--batch-size", "4", "--learning-rate", "1e-2",
            "--warmup-steps", "1", "--seed", "0"]
CLIENTS = ("alice", "bob")
# plaintext on loopback: these tests are about faults (where TLS is the default, it must be turned off explicitly)
PLAINTEXT = ["--insecure"]


@dataclass
class Role:
    """One process of the federation, restarted after each planned kill."""

    name: str
    args: list[str]
    logs: Path
    faults: list[str] = field(default_factory=list)  # one per incarnation that must die
    proc: subprocess.Popen | None = None
    incarnation: int = 0

    def start(self) -> "Role":
        env = dict(ENV)
        if self.incarnation < len(self.faults):
            env["SPLITLORA_FAULT"] = self.faults[self.incarnation]
        with (self.logs / f"{self.name}.{self.incarnation}.log").open("w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-6000:]}" for p in sorted(self.logs.glob(f"{self.name}.*.log")))

    def poll(self) -> int | None:
        """None while running (restarting it after a planned kill), else its final exit code."""
        rc = self.proc.poll()
        if rc == -signal.SIGKILL and self.incarnation < len(self.faults):
            self.incarnation += 1
            self.start()
            return None
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def server(tmp: Path, port: int, *extra: str, faults: list[str] | None = None) -> Role:
    return Role("server", [str(BIN / "splitlora-server"), "serve", "--port", str(port), "--clients", str(len(CLIENTS)),
                           "--output", str(tmp / "server"), "--finish-grace-seconds", "60",
                           "--server-adapter-mode", "per-client", *TRAINING, *PLAINTEXT, *extra], tmp, faults or [])


def aggregator(tmp: Path, port: int, faults: list[str] | None = None) -> Role:
    return Role("aggregator", [str(BIN / "splitlora-server"), "aggregate", "--port", str(port), "--clients",
                               str(len(CLIENTS)), "--rounds", str(ROUNDS), "--output", str(tmp / "aggregator"),
                               "--finish-grace-seconds", "60", *PLAINTEXT], tmp, faults or [])


def client(tmp: Path, name: str, server_port: int, *extra: str, faults: list[str] | None = None) -> Role:
    return Role(name, [str(BIN / "splitlora-client"), "train", "--server", f"127.0.0.1:{server_port}", "--client-id",
                       name, "--seed", str(CLIENTS.index(name)), "--output", str(tmp / name), "--no-progress",
                       "--builtin-examples", "32", "--reconnect-backoff-max", "0.5", "--join-timeout", "60",
                       *PLAINTEXT, *extra],
                tmp, faults or [])


def run_all(roles: list[Role], timeout: float = 180.0) -> None:
    """Wait until every role has exited 0, restarting planned kills; fail with the logs otherwise."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [r.poll() for r in roles]
            failed = [r for r, c in zip(roles, codes) if c not in (None, 0)]
            assert not failed, "\n".join(f"{r.name} exited {r.proc.returncode}\n{r.log_text()}" for r in failed)
            if all(c == 0 for c in codes):
                break
            assert time.monotonic() < deadline, "timed out\n" + "\n".join(r.log_text() for r in roles)
            time.sleep(0.1)
        for r in roles:
            assert r.incarnation == len(r.faults), f"{r.name}: {r.incarnation} of {len(r.faults)} planned kills"
    finally:
        for r in roles:
            r.kill()


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[0]}"


def results(tmp: Path, aggregator_dir: Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The final adapters of a run: the server adapter, the last global adapter and each client's."""
    agg = aggregator_dir or tmp / "server" / "aggregator"
    return {"server adapter": load(tmp / "server" / "server_adapter.safetensors"),
            "global adapter": load(agg / "global" / f"round-{ROUNDS - 1:04d}.safetensors"),
            **{f"{name}'s adapter": load(tmp / name / "client_adapter.safetensors") for name in CLIENTS}}
