"""Threads that fit the device: defaults per role and device, overridable, logged, and following the CPU
affinity a process is started with (a real process under taskset)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from common.config.engine import ConfigError
from common.threads import GPU_TORCH_THREADS, apply_threads, default_torch_threads, usable_cores
from splitlora_client.options import TrainConfig
from splitlora_server.options import ServeConfig


def test_defaults_follow_the_device(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_torch_threads("cpu") == usable_cores()
    assert default_torch_threads("cuda:0") == min(GPU_TORCH_THREADS, usable_cores())


def test_the_environment_s_omp_num_threads_wins_over_the_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_torch_threads("cpu") == default_torch_threads("cuda") == 3


def test_apply_sets_and_logs_the_threads(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="common.threads"):
            assert apply_threads("server", 1, "cpu", grpc_workers=28) == 1
            assert torch.get_num_threads() == 1
            assert apply_threads("client c", 0) == usable_cores() == torch.get_num_threads()
        assert "server threads: torch 1 intra-op (--torch-threads) on cpu" in caplog.text
        assert "gRPC handler pool 28" in caplog.text and "client c threads: torch" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_negative_thread_counts_are_refused():
    for cfg in (ServeConfig(insecure=True, torch_threads=-1), TrainConfig(insecure=True, torch_threads=-1)):
        with pytest.raises(ConfigError, match="torch_threads must be >= 0"):
            cfg.validate()


def test_a_process_pinned_to_one_core_defaults_to_one_thread():
    code = ("from common.threads import apply_threads, usable_cores; import torch; "
            "print(usable_cores(), apply_threads('client', 0), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out == ["1", "1", "1"]
