"""Threads that fit the device: torch's intra-op threads and the gRPC pool of each role, logged at start.

The defaults follow where the role computes. A client (an edge device) computes on its CPU: every core it may
use goes to torch. A server computing on the CPU does the same; one computing on a GPU keeps a few CPU threads
for torch (the CPU work is small there) and leaves the cores to its gRPC handlers. The gRPC handler threads
never run torch's parallel ops (frames are decoded and checked in numpy, `common.wire`), so the one compute
thread's OpenMP team is the only one: more OpenMP threads than cores make libgomp throttle that team.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from common.config.engine import ConfigError, option

log = logging.getLogger(__name__)
GPU_TORCH_THREADS = 4  # CPU threads of torch when the role computes on a GPU


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class ThreadOptions:
    """torch's intra-op threads of this role."""

    torch_threads: int = option(0, "torch intra-op threads (0: OMP_NUM_THREADS if set, else every usable core when "
                                   f"computing on the CPU, at most {GPU_TORCH_THREADS} when computing on a GPU).")

    def validate_threads(self) -> None:
        """A thread count is a count."""
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be >= 0, got {self.torch_threads}")


def default_torch_threads(device: str = "cpu") -> int:
    """The intra-op threads a role computing on `device` gets when --torch-threads is 0: OMP_NUM_THREADS when the
    environment sets it, else every usable core on the CPU and a few on a GPU."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = usable_cores()
    return cores if device.startswith("cpu") else min(GPU_TORCH_THREADS, cores)


def apply_threads(role: str, requested: int, device: str = "cpu", grpc_workers: int | None = None) -> int:
    """Set torch's intra-op threads (`requested`, or the default for `device` when 0), log the placement, and
    return the thread count."""
    threads = requested or default_torch_threads(device)
    torch.set_num_threads(threads)
    pool = f", gRPC handler pool {grpc_workers}" if grpc_workers is not None else ""
    source = "--torch-threads" if requested else "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "default"
    log.info("%s threads: torch %d intra-op (%s) on %s, %d usable cores%s", role, threads, source, device,
             usable_cores(), pool)
    return threads
