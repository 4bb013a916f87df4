"""Real processes through the console scripts: a split server, clients, and what they leave behind."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

BIN = Path(sys.executable).parent


PLAINTEXT_FLAGS = ["--insecure"]  # loopback and private namespaces: the benchmarks measure the protocol, not TLS


def env(threads: int) -> dict[str, str]:
    """The environment of every process started: fixed torch threads, the same SPLITLORA_HOME."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def fresh(work: Path) -> Path:
    """An empty work directory (metrics files are appended to, so an earlier run's must go)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (so a server and its clients can start together)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: Sequence[str], log: Path, threads: int, prefix: Sequence[str] = (),
                 port: int | None = None) -> tuple[subprocess.Popen, int]:
    """`splitlora-server serve ARGS`. With `port`, return at once (clients retry their Join until it is up);
    without, wait until it prints the free port it picked."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*prefix, str(BIN / "splitlora-server"), "serve", "--port", str(port or 0), *args],
                            stdout=subprocess.PIPE if port is None else log.with_suffix(".out").open("w"),
                            stderr=log.open("w"), text=True, env=env(threads))
    if port is not None:
        return proc, port
    line = proc.stdout.readline()
    match = re.search(r"listening on \S+:(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}; see {log}")
    return proc, int(match.group(1))


def start_client(args: Sequence[str], log: Path, threads: int, prefix: Sequence[str] = ()) -> subprocess.Popen:
    """`splitlora-client train ARGS --no-progress`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([*prefix, str(BIN / "splitlora-client"), "train", "--no-progress", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env(threads))


def wait_all(procs: Sequence[subprocess.Popen], timeout: float, logs: Sequence[Path] = ()) -> None:
    """Wait for every process; raise with the log tails if one fails."""
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        stop(procs)
    if any(codes):
        tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in logs if log.exists())
        raise RuntimeError(f"a benchmark process failed (exit codes {codes})\n{tails}")


def stop(procs: Sequence[subprocess.Popen]) -> None:
    """Kill whatever is still running of `procs` (only processes this benchmark started)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def steps(metrics: Path) -> list[dict]:
    """The per-step records of a client's metrics.jsonl."""
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("event") == "step"]


def cpu_stat() -> list[int]:
    """The machine's CPU time counters (user, nice, system, idle, ...) from /proc/stat; [] where there is none."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return []


def niced_share(before: list[int]) -> float:
    """The share of all CPU time since `before` (a `cpu_stat()`) that niced processes (nice > 0) used: what other
    work running at a lower priority took from a benchmark; nan without /proc/stat."""
    after = cpu_stat()
    if not before or not after:
        return float("nan")
    delta = [a - b for a, b in zip(after, before)]
    return delta[1] / max(sum(delta[:8]), 1)
