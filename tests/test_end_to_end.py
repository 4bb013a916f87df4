"""Real processes through the console scripts: `splitlora-server certs` makes the certificates, then a server (with
its aggregator) and two clients train two rounds over mutual TLS."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from splitlora_bench.procs import BIN

TRAINING = ["--rounds", "2", "--local-steps", "6", "--batch-size", "4", "--learning-rate", "1e-2",
            "--warmup-steps", "1", "--seed", "0", "--lora-targets", "c_attn,c_fc"]


def _make_certs(certs: Path, env: dict[str, str]) -> None:
    done = subprocess.run([str(BIN / "splitlora-server"), "certs", "--output", str(certs), "--server-names",
                           "server,localhost,127.0.0.1", "--clients", "alice,bob", "--days", "2"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    names = {"ca", "server", "alice", "bob", "admin"}
    assert {p.name for p in certs.iterdir()} == {f"{n}.{ext}" for n in names for ext in ("pem", "key")}
    assert all((certs / f"{n}.key").stat().st_mode & 0o777 == 0o600 for n in names)


def _server_tls(certs: Path) -> list[str]:
    return ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
            "--tls-ca", str(certs / "ca.pem"), "--require-client-cert"]


def _start(tmp: Path, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Start a server command on port 0 and read the port it prints."""
    log = (tmp / f"{name}.log").open("w")
    proc = subprocess.Popen([str(BIN / "splitlora-server"), *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
    assert match, f"{name} did not start: {line!r} {(tmp / f'{name}.log').read_text()}"
    return proc, int(match.group(1))


def _clients(port: int, tmp: Path, env: dict[str, str], certs: Path, *extra: str) -> list[subprocess.Popen]:
    return [subprocess.Popen([str(BIN / "splitlora-client"), "train", "--server", f"localhost:{port}",
                              "--client-id", name, "--seed", str(i), "--output", str(tmp / name),
                              "--no-progress", "--lora-targets", "c_attn,c_fc", "--tls-ca", str(certs / "ca.pem"),
                              "--tls-cert", str(certs / f"{name}.pem"), "--tls-key", str(certs / f"{name}.key"),
                              *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for i, name in enumerate(("alice", "bob"))]


def _wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> None:
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * len(procs), outputs
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None


def _losses(path: Path) -> dict[int, list[float]]:
    by_round: dict[int, list[float]] = {}
    for record in map(json.loads, path.read_text().splitlines()):
        if record["event"] == "step":
            by_round.setdefault(record["round"], []).append(record["loss"])
    return by_round


def test_two_clients_two_rounds_over_mutual_tls_through_console_scripts(tmp_path: Path, builtin_model_dir: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    certs = tmp_path / "certs"
    _make_certs(certs, env)
    server, port = _start(tmp_path, "server", ["serve", "--clients", "2", "--output", str(tmp_path / "server"),
                                                "--finish-grace-seconds", "10", *_server_tls(certs), *TRAINING], env)
    _wait_all([*_clients(port, tmp_path, env, certs), server])
    assert "serves TLS on" in (tmp_path / "server.log").read_text()

    for name in ("alice", "bob"):
        losses = _losses(tmp_path / name / "metrics.jsonl")
        assert sorted(losses) == [0, 1] and all(len(v) == 6 for v in losses.values())
        assert sum(losses[1]) / 6 < sum(losses[0]) / 6, losses  # the loss fell from round 1 to round 2

    adapter_dir = tmp_path / "server" / "adapter"
    exported = load_file(str(adapter_dir / "adapter_model.safetensors"))
    alice = load_file(str(tmp_path / "alice" / "client_adapter.safetensors"))
    bob = load_file(str(tmp_path / "bob" / "client_adapter.safetensors"))
    assert set(alice) < set(exported) and set(alice) == set(bob)
    for key in alice:  # both clients ended on the global adapter, which is what was exported
        assert torch.equal(alice[key], bob[key]) and torch.equal(alice[key], exported[key])
    assert any(".h.5." in k for k in exported) and any(".h.0." in k for k in exported)

    base = AutoModelForCausalLM.from_pretrained(builtin_model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    lora_keys = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora_keys) == len(exported)


def test_separate_aggregator_then_export_command(tmp_path: Path, builtin_model_dir: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    training = ["--rounds", "1", "--local-steps", "3", "--batch-size", "4", "--warmup-steps", "1"]
    certs = tmp_path / "certs"
    _make_certs(certs, env)
    aggregator, agg_port = _start(tmp_path, "aggregator", ["aggregate", "--clients", "2", "--rounds", "1",
                                                           "--output", str(tmp_path / "aggregator"),
                                                           "--lora-targets", "c_attn,c_fc", *_server_tls(certs)], env)
    server, port = _start(tmp_path, "server", ["serve", "--clients", "2", "--aggregator", f"localhost:{agg_port}",
                                               "--output", str(tmp_path / "server"), *training,
                                               "--lora-targets", "c_attn,c_fc", *_server_tls(certs)], env)
    _wait_all([*_clients(port, tmp_path, env, certs), server, aggregator])
    assert not (tmp_path / "server" / "adapter").exists()  # the split server never saw the client adapters
    export = subprocess.run([str(BIN / "splitlora-server"), "export", "--aggregator-dir", str(tmp_path / "aggregator"),
                             "--server-adapter", str(tmp_path / "server" / "server_adapter.safetensors"),
                             "--output", str(tmp_path / "export"), "--lora-targets", "c_attn,c_fc"],
                            capture_output=True, text=True, env=env)
    assert export.returncode == 0, export.stderr
    exported = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    alice = load_file(str(tmp_path / "alice" / "client_adapter.safetensors"))
    server_half = load_file(str(tmp_path / "server" / "server_adapter.safetensors"))
    assert set(exported) == set(alice) | set(server_half)
    assert all(torch.equal(exported[k], v) for k, v in {**alice, **server_half}.items())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir), tmp_path / "export")
    assert sum("lora_" in n for n, _ in model.named_parameters()) == len(exported)


def test_u_shape_two_clients_over_mutual_tls_through_console_scripts(tmp_path: Path, builtin_model_dir: Path):
    """Labels stay home: the clients hold block 5 and the head (--split-mode u-shape --top-blocks 1), the loss is
    theirs and falls, and the exported adapter of the three parts loads on the unsplit model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    certs = tmp_path / "certs"
    _make_certs(certs, env)
    u_shape = ["--split-mode", "u-shape", "--top-blocks", "1"]
    server, port = _start(tmp_path, "server", ["serve", "--clients", "2", "--output", str(tmp_path / "server"),
                                                "--finish-grace-seconds", "10", *_server_tls(certs), *TRAINING,
                                                *u_shape], env)
    _wait_all([*_clients(port, tmp_path, env, certs, *u_shape), server])
    for name in ("alice", "bob"):
        losses = _losses(tmp_path / name / "metrics.jsonl")
        assert sorted(losses) == [0, 1] and all(len(v) == 6 for v in losses.values())
        assert sum(losses[1]) / 6 < sum(losses[0]) / 6, losses
    exported = load_file(str(tmp_path / "server" / "adapter" / "adapter_model.safetensors"))
    alice = load_file(str(tmp_path / "alice" / "client_adapter.safetensors"))
    assert any(".h.5." in k for k in alice) and any(".h.0." in k for k in alice)  # bottom and top on the client
    assert not any(".h.3." in k for k in alice) and any(".h.3." in k for k in exported)  # the middle: the server's
    assert all(torch.equal(alice[k], exported[k]) for k in alice)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir),
                                      tmp_path / "server" / "adapter")
    assert len([n for n, _ in model.named_parameters() if "lora_" in n]) == len(exported)
