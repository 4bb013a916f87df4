"""ffa and fedex end to end: a split server (aggregator in process, per-client server adapters) and two client
processes train two rounds; ffa clients never move A; the fedex export loaded with PeftModel.from_pretrained on
the unsplit base scores a batch exactly as the trained split pipeline (global adapter + folded residuals)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from splitlora_bench.procs import BIN
from common.lora import ADAPTER_CONFIG, load_adapter_state
from common.residuals import ResidualFolder, split_residuals
from common.split.parts import LoraSettings, SplitPart
from splitlora_server.app import start_server
from splitlora_server.options import ServeConfig
from tests.support.split_reference import model_loss, padded_batch, split_loss

CLIENTS = ("alice", "bob")


def run(tmp: Path, aggregation: str) -> tuple[ServeConfig, dict[str, Path], Path]:
    """Train 2 rounds x 3 steps; return the config, each client's final adapter file and the export."""
    cfg = ServeConfig(port=0, host="127.0.0.1", clients=2, rounds=2, local_steps=3, batch_size=4, warmup_steps=1,
                      learning_rate=2e-2, seed=3, output=str(tmp / "server"), insecure=True,
                      server_adapter_mode="per-client", aggregation=aggregation, finish_grace_seconds=0.0)
    cfg.validate()
    running = start_server(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(BIN / "splitlora-client"), "train", "--server", f"127.0.0.1:{running.port}",
                               "--client-id", name, "--seed", str(i), "--output", str(tmp / name), "--no-progress",
                               "--insecure", "--builtin-examples", str(16 + 24 * i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i, name in enumerate(CLIENTS)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert running.wait_finished()
        exported = running.export()
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None
        running.stop(grace=0)
    return cfg, {c: tmp / c / "client_adapter.safetensors" for c in CLIENTS}, exported


def test_ffa_clients_keep_a_at_its_initialisation(tmp_path: Path, builtin_model_dir: Path) -> None:
    cfg, adapters, _ = run(tmp_path, "ffa")
    initial = SplitPart(builtin_model_dir, "client", cfg.split_layer, cfg.lora_settings(), lora_seed=cfg.seed)
    start = {n.replace(".default", ""): p for n, p in initial.peft.named_parameters() if "lora_" in n}
    finals = [load_file(str(path)) for path in adapters.values()]
    for key, value in finals[0].items():
        assert torch.equal(value, finals[1][key])  # both hold the last global adapter
        if "lora_A" in key:
            assert torch.equal(value, start[key]), key
        else:
            assert not torch.equal(value, start[key]), key


@pytest.mark.parametrize("aggregation", ["fedex"])
def test_fedex_export_loads_on_the_unsplit_model_and_matches_training(aggregation: str, tmp_path: Path,
                                                                      builtin_model_dir: Path) -> None:
    cfg, adapters, exported = run(tmp_path, aggregation)
    final = load_file(str(adapters["alice"]))
    assert split_residuals(final)[1], "the client's adapter file carries the folded residuals"
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, 0.0, tuple(cfg.lora_targets))
    parts = []
    for side, state in (("client", final), ("server", load_file(str(Path(cfg.output) / "server_adapter.safetensors")))):
        part = SplitPart(builtin_model_dir, side, cfg.split_layer, lora, lora_seed=cfg.seed).eval()
        adapter, residuals = split_residuals(state)
        load_adapter_state(part.peft, adapter)
        ResidualFolder(part.peft).fold(residuals)
        parts.append(part)
    batch = padded_batch(parts[0].vocab_size, lengths=(12, 7), seed=5)
    trained = split_loss(*parts, batch)

    assert "rank_pattern" in (exported / ADAPTER_CONFIG).read_text()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(builtin_model_dir)),
                                      str(exported)).eval()
    with torch.no_grad():
        loaded = model_loss(model, batch)
        with model.disable_adapter():
            base = model_loss(model, batch)
    assert abs(loaded.item() - trained.item()) < 1e-5, (loaded.item(), trained.item())
    assert abs(base.item() - trained.item()) > 1e-3  # the adapter and residuals really change the model
