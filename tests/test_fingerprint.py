"""The handshake fingerprint: the client and the server compute the same one from their own copies of a
checkpoint, and `differences` says in plain words what does not match. It covers what both sides must agree on
(config, tensor index, client-side weights, split, LoRA) and nothing the server alone owns."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.fingerprint import compute_fingerprint, differences
from common.plan import apply_plan, options_json
from common.split.parts import LoraSettings
from splitlora_client.options import TrainConfig
from splitlora_server.options import ServeConfig

SPLIT_LAYER = 2
WEIGHTS = "model.safetensors"


def _copy_with_change(src: Path, dst: Path, tensor: str) -> Path:
    """Copy a model directory and change one element of one stored tensor by one ulp (re-saved as
    safetensors; every other tensor keeps its exact bytes)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / WEIGHTS))
    before = tensors[tensor].clone()
    flat = tensors[tensor].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})
    after = load_file(str(dst / WEIGHTS))[tensor]
    assert int((after != before).sum()) == 1
    return dst


def _labels(diff: list[str]) -> list[str]:
    return [line.split(":", 1)[0] for line in diff]


def test_client_and_server_compute_the_same_fingerprint(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Each role computes it from its own config and its own copy of the checkpoint."""
    server_copy = shutil.copytree(tiny_gpt2_dir, tmp_path / "server-copy")
    client_cfg = TrainConfig(model=str(tiny_gpt2_dir), split_layer=SPLIT_LAYER)  # pins the split layer only
    server_cfg = ServeConfig(model=str(server_copy), split_layer=SPLIT_LAYER, lora_targets=["c_attn"])
    apply_plan(client_cfg, options_json(server_cfg))  # the rest comes with the server's plan
    on_client = compute_fingerprint(client_cfg.model, client_cfg.split_layer, client_cfg.lora_settings())
    on_server = compute_fingerprint(server_cfg.model, server_cfg.split_layer, server_cfg.lora_settings())
    assert on_client == on_server
    assert differences(on_server, on_client) == []
    assert (on_client.family, on_client.split_layer, on_client.num_layers) == ("gpt2", SPLIT_LAYER, 4)
    assert (on_client.hidden_size, on_client.vocab_size) == (32, 96)
    assert all(len(h) == 64 for h in (on_client.config_sha256, on_client.index_sha256,
                                      on_client.client_weights_sha256, on_client.lora_sha256))


def test_different_split_layer(tiny_gpt2_dir: Path) -> None:
    server = compute_fingerprint(tiny_gpt2_dir, 3, LoraSettings())
    client = compute_fingerprint(tiny_gpt2_dir, SPLIT_LAYER, LoraSettings())
    diff = differences(server, client)
    assert "split layer: server 3, client 2" in diff
    # the client would hold different blocks, so its weights hash differs too; nothing else does
    assert sorted(_labels(diff)) == ["client-side base weights", "split layer"]


def test_different_lora_rank(tiny_gpt2_dir: Path) -> None:
    server = compute_fingerprint(tiny_gpt2_dir, SPLIT_LAYER, LoraSettings(r=8))
    client = compute_fingerprint(tiny_gpt2_dir, SPLIT_LAYER, LoraSettings(r=4))
    diff = differences(server, client)
    assert diff == [f"LoRA config: server {server.lora_sha256[:12]}, client {client.lora_sha256[:12]}"]


@pytest.mark.parametrize("tensor", ["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"])
def test_changed_client_side_weight(tiny_gpt2_dir: Path, tmp_path: Path, tensor: str) -> None:
    changed = _copy_with_change(tiny_gpt2_dir, tmp_path / "changed", tensor)
    server = compute_fingerprint(tiny_gpt2_dir, SPLIT_LAYER, LoraSettings())
    client = compute_fingerprint(changed, SPLIT_LAYER, LoraSettings())
    diff = differences(server, client)
    assert _labels(diff) == ["client-side base weights"]
    assert diff[0] == (f"client-side base weights: server {server.client_weights_sha256[:12]}, "
                       f"client {client.client_weights_sha256[:12]}")


@pytest.mark.parametrize("tensor", ["transformer.h.3.mlp.c_fc.weight", "transformer.ln_f.bias"])
def test_changed_server_only_weight_is_not_the_clients_concern(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                tensor: str) -> None:
    changed = _copy_with_change(tiny_gpt2_dir, tmp_path / "changed", tensor)
    original = compute_fingerprint(tiny_gpt2_dir, SPLIT_LAYER, LoraSettings())
    perturbed = compute_fingerprint(changed, SPLIT_LAYER, LoraSettings())
    assert perturbed.client_weights_sha256 == original.client_weights_sha256
    assert differences(original, perturbed) == []


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_config_bookkeeping_keys_do_not_count(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    resaved = _copy_with_config(tiny_gpt2_dir, tmp_path / "resaved", transformers_version="4.46.0",
                                architectures=["SomethingElse"], use_cache=False)
    assert differences(compute_fingerprint(tiny_gpt2_dir, SPLIT_LAYER, LoraSettings()),
                       compute_fingerprint(resaved, SPLIT_LAYER, LoraSettings())) == []


def test_functional_config_change(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    changed = _copy_with_config(tiny_gpt2_dir, tmp_path / "changed", layer_norm_epsilon=1e-3)
    diff = differences(compute_fingerprint(tiny_gpt2_dir, SPLIT_LAYER, LoraSettings()),
                       compute_fingerprint(changed, SPLIT_LAYER, LoraSettings()))
    assert _labels(diff) == ["base model config"]
