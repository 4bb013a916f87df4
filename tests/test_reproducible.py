"""With the same seeds, a CPU run is reproducible: the same adapters, bit for bit."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from splitlora_client.config import TrainConfig
from splitlora_client.trainer import train
from splitlora_server.app import start_server
from splitlora_server.config import ServeConfig


def _run(out: Path, seed: int) -> tuple[dict, dict]:
    running = start_server(ServeConfig(port=0, clients=1, rounds=2, local_steps=3, batch_size=4, warmup_steps=1,
                                       learning_rate=5e-3, seed=seed, output=str(out / "server"), insecure=True))
    try:
        client_path = train(TrainConfig(server=f"127.0.0.1:{running.port}", client_id="solo", seed=seed,
                                        output=str(out / "solo"), progress=False, builtin_examples=32,
                                        insecure=True))
        assert running.wait_finished()
        adapter = running.export()
    finally:
        running.stop(grace=0)
    return load_file(str(client_path)), load_file(str(adapter / "adapter_model.safetensors"))


def test_same_seed_same_adapters(tmp_path: Path, builtin_model_dir: Path):
    client_a, whole_a = _run(tmp_path / "a", seed=7)
    client_b, whole_b = _run(tmp_path / "b", seed=7)
    assert client_a.keys() == client_b.keys() and whole_a.keys() == whole_b.keys()
    assert all(torch.equal(client_a[k], client_b[k]) for k in client_a)
    assert all(torch.equal(whole_a[k], whole_b[k]) for k in whole_a)
    _, whole_c = _run(tmp_path / "c", seed=8)
    assert any(not torch.equal(whole_a[k], whole_c[k]) for k in whole_a)
