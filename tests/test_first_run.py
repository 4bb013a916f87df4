"""A new user's first run, through the console scripts with real files: a GPT-2-shaped checkpoint with GPT-2's
own tokenizer files (no pad token), clients started with only --server, --model, --data, --client-id, --output
and their certificates (the README's several-machines commands), a client that fails on its own data without
taking a slot, and a second server on a taken port refused."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from splitlora_bench.procs import BIN, free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SHARED = Path("/work/shared/data")
GPT2_EOS = 50256


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory) -> Path:
    """A 4-block, 32-wide GPT-2 with GPT-2's vocabulary, saved with GPT-2's own tokenizer files beside it."""
    path = tmp_path_factory.mktemp("gpt2-shaped")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=GPT2_EOS + 1, n_positions=128, n_embd=32, n_layer=4, n_head=4,
                        bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):  # as downloaded: no tokenizer_config.json
        shutil.copy(SHARED / "gpt2-tokenizer" / name, path / name)
    return path


def _start_server(tmp: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, int]:
    log = (tmp / f"{name}.log").open("w")
    proc = subprocess.Popen([str(BIN / "splitlora-server"), *args], stdout=subprocess.PIPE, stderr=log, text=True,
                            env=ENV)
    line = proc.stdout.readline()
    match = re.search(r"listening on [\d.]+:(\d+)", line)
    assert match, f"{name} did not start: {line!r} {(tmp / f'{name}.log').read_text()}"
    return proc, int(match.group(1))


def _client(certs: Path, port: int, model: Path, data: Path, name: str, out: Path) -> list[str]:
    """The README's client command: four flags, the output, and the client's certificate."""
    return [str(BIN / "splitlora-client"), "train", "--server", f"localhost:{port}", "--model", str(model),
            "--data", str(data), "--client-id", name, "--output", str(out),
            "--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / f"{name}.pem"),
            "--tls-key", str(certs / f"{name}.key")]


def test_a_second_server_on_a_taken_port_is_refused(tmp_path: Path) -> None:
    port = free_port()
    first, _ = _start_server(tmp_path, "first", ["serve", "--insecure", "--port", str(port), "--output",
                                                 str(tmp_path / "first")])
    try:
        for role in ("serve", "aggregate"):
            second = subprocess.run([str(BIN / "splitlora-server"), role, "--insecure", "--port", str(port),
                                     "--output", str(tmp_path / role)], capture_output=True, text=True, env=ENV,
                                    timeout=120)
            assert second.returncode == 1, second.stderr
            assert f"cannot listen on 127.0.0.1:{port}: the port is taken" in second.stderr
        assert first.poll() is None  # the first one still serves
    finally:
        first.kill()
        first.wait()


def test_gpt2_tokenizer_and_four_flag_clients_over_mutual_tls(gpt2_model: Path, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    made = subprocess.run([str(BIN / "splitlora-server"), "certs", "--output", str(certs), "--server-names",
                           "localhost,127.0.0.1", "--clients", "alice,bob,carol"], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert made.returncode == 0, made.stderr
    lines = (SHARED / "e2e" / "valid.txt").read_text().splitlines()
    data = {name: tmp_path / f"{name}.txt" for name in ("alice", "bob", "carol")}
    data["alice"].write_text("\n".join(lines[:24]) + "\n")
    data["bob"].write_text("\n".join(lines[24:48]) + "\n")
    data["carol"].write_text("\n")  # empty: carol fails on her own data
    tls = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
           "--tls-ca", str(certs / "ca.pem"), "--require-client-cert"]
    server, port = _start_server(tmp_path, "server", [
        "serve", "--port", "0", "--model", str(gpt2_model), "--split-layer", "2", "--clients", "2", "--rounds", "2",
        "--local-steps", "3", "--batch-size", "4", "--learning-rate", "1e-2", "--lora-r", "8",
        "--lora-targets", "c_attn,c_fc", "--output", str(tmp_path / "server"), "--finish-grace-seconds", "60", *tls])
    try:
        carol = subprocess.run(_client(certs, port, gpt2_model, data["carol"], "carol", tmp_path / "carol"),
                               capture_output=True, text=True, env=ENV, timeout=120)
        assert carol.returncode == 1 and f"{data['carol']}: file is empty" in carol.stderr, carol.stderr
        clients = [subprocess.Popen(_client(certs, port, gpt2_model, data[n], n, tmp_path / n), env=ENV, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in ("alice", "bob")]
        outputs = [c.communicate(timeout=300)[0] for c in clients]
        assert [c.returncode for c in clients] == [0, 0], outputs
        assert server.wait(timeout=120) == 0
    finally:
        for proc in (server, *locals().get("clients", [])):
            proc.kill() if proc.poll() is None else None
    server_log = (tmp_path / "server.log").read_text()
    assert "FutureWarning" not in server_log and not any("FutureWarning" in out for out in outputs)
    assert "warm-up capped at 0 steps" in server_log  # the 500-step default on a 6-step run, said once
    exported = load_file(str(tmp_path / "server" / "adapter" / "adapter_model.safetensors"))
    assert any(".h.1.mlp.c_fc.lora_A" in k for k in exported) and any(".h.2.attn.c_attn" in k for k in exported)
    assert {tuple(v.shape) for k, v in exported.items() if "c_attn.lora_A" in k} == {(8, 32)}  # the plan's rank
    base = AutoModelForCausalLM.from_pretrained(gpt2_model)
    for name, out in zip(("alice", "bob"), outputs):
        assert "plan of localhost" in out and "taken from the server: split_layer, split_mode, top_blocks, lora_r" in out
        steps = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert sorted({r["round"] for r in steps if r["event"] == "step"}) == [0, 1]
        whole = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        assert whole.keys() == exported.keys() and all(torch.equal(whole[k], exported[k]) for k in whole)
        model = PeftModel.from_pretrained(base, tmp_path / name / "adapter")  # every data owner gets the model
        assert sum("lora_" in n for n, _ in model.named_parameters()) == len(whole)
        base = model.unload()
