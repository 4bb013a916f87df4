"""One server and one client in this process over loopback: the adapters a short run ends with."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from splitlora_client.options import TrainConfig
from splitlora_client.trainer import train
from splitlora_server.app import start_server
from splitlora_server.options import ServeConfig


def solo_run(out: Path, seed: int, serve: dict[str, Any] | None = None, observe: Callable | None = None,
             **client: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train 2 rounds x 3 steps with client "solo" (extra ServeConfig fields in `serve`, TrainConfig fields in
    `client`, `observe` wraps its channel as `train` does); return its final adapter and the exported whole-model
    adapter."""
    running = start_server(ServeConfig(**{"port": 0, "clients": 1, "rounds": 2, "local_steps": 3, "batch_size": 4,
                                          "warmup_steps": 1, "learning_rate": 5e-3, "seed": seed,
                                          "output": str(out / "server"), "insecure": True, **(serve or {})}))
    try:
        client_path = train(TrainConfig(server=f"127.0.0.1:{running.port}", client_id="solo", seed=seed,
                                        output=str(out / "solo"), progress=False, builtin_examples=32,
                                        insecure=True, **client), observe=observe)
        assert running.wait_finished()
        whole = running.export()
    finally:
        running.stop(grace=0)
    return load_file(str(client_path)), load_file(str(whole / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two adapters with the same tensors."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
