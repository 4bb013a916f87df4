"""The exported adapter is a standard PEFT adapter for the whole model: loaded with PeftModel.from_pretrained
on the unsplit base it scores a batch exactly as the trained split pipeline does. Bad adapters are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, adapter_state, check_adapter, export_adapter
from tests.support.split_reference import (EXACT, build_parts, lora_params, model_loss, padded_batch,
                                           split_forward_backward, split_loss)

SPLIT_LAYER = 2
STEPS = 4


@pytest.fixture(scope="module")
def trained(tiny_gpt2_dir: Path):
    """Client and server parts after a few real AdamW steps of split training (adapters far from init)."""
    client, server = build_parts(tiny_gpt2_dir, SPLIT_LAYER)
    batch = padded_batch(client.vocab_size, seed=11)
    optims = [torch.optim.AdamW(lora_params(p.peft).values(), lr=3e-2) for p in (client, server)]
    losses = []
    for _ in range(STEPS):
        for opt in optims:
            opt.zero_grad()
        losses.append(split_forward_backward(client, server, batch).item())
        for opt in optims:
            opt.step()
    assert split_loss(client, server, batch).item() < losses[0] - 0.05, losses  # training really moved them
    return client, server, batch


def _export(out: Path, client, server, base: Path) -> Path:
    return export_adapter(out, EXACT.peft_config(client.family), adapter_state(client.peft),
                          adapter_state(server.peft), base_model=str(base))


def test_exported_adapter_matches_split(trained, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    client, server, batch = trained
    out = _export(tmp_path / "adapter", client, server, tiny_gpt2_dir)

    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_gpt2_dir)
    assert config["r"] == EXACT.r and config["lora_alpha"] == EXACT.alpha and config["fan_in_fan_out"] is True
    weights = load_file(str(out / ADAPTER_WEIGHTS))
    assert set(weights) == set(adapter_state(client.peft)) | set(adapter_state(server.peft))
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)), str(out)).eval()
    with torch.no_grad():
        exported = model_loss(model, batch)
        with model.disable_adapter():
            base_only = model_loss(model, batch)
    expected = split_loss(client, server, batch)
    assert torch.allclose(exported, expected, atol=1e-5, rtol=0), (exported.item(), expected.item())
    assert abs(base_only.item() - expected.item()) > 0.05  # the adapter matters, so the match means something


def test_overlapping_parts_refused(trained, tmp_path: Path) -> None:
    client, _, _ = trained
    state = adapter_state(client.peft)
    out = tmp_path / "adapter"
    with pytest.raises(AdapterError, match="overlap on .*h\\.0\\.attn\\.c_attn\\.lora_A"):
        export_adapter(out, EXACT.peft_config(client.family), state, {k: v.clone() for k, v in state.items()})
    assert not out.exists()  # nothing half-written


@pytest.fixture(scope="module")
def reference_state(trained) -> dict[str, torch.Tensor]:
    return adapter_state(trained[1].peft)


def test_check_adapter_accepts_a_copy(reference_state) -> None:
    check_adapter({k: v.clone() for k, v in reference_state.items()}, reference_state)


def test_check_adapter_refuses_missing_key(reference_state) -> None:
    missing = sorted(reference_state)[0]
    state = {k: v for k, v in reference_state.items() if k != missing}
    with pytest.raises(AdapterError, match=f"missing \\['{missing}'\\]"):
        check_adapter(state, reference_state)


def test_check_adapter_refuses_unexpected_key(reference_state) -> None:
    state = {**reference_state, "base_model.model.transformer.h.9.attn.c_attn.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(AdapterError, match="unexpected .*h\\.9"):
        check_adapter(state, reference_state)


def test_check_adapter_refuses_wrong_shape(reference_state) -> None:
    key = sorted(reference_state)[0]
    rows, cols = reference_state[key].shape
    state = {**reference_state, key: torch.zeros(rows + 1, cols)}
    with pytest.raises(AdapterError, match=f"{key} has shape \\({rows + 1}, {cols}\\), expected \\({rows}, {cols}\\)"):
        check_adapter(state, reference_state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_adapter_refuses_non_finite(reference_state, bad: float) -> None:
    key = sorted(reference_state)[-1]
    value = reference_state[key].clone()
    value.view(-1)[3] = bad
    with pytest.raises(AdapterError, match=f"{key} contains NaN or Inf"):
        check_adapter({**reference_state, key: value}, reference_state)


def test_check_adapter_refuses_integer_tensor(reference_state) -> None:
    key = sorted(reference_state)[0]
    state = {**reference_state, key: reference_state[key].to(torch.int32)}
    with pytest.raises(AdapterError, match=f"{key} has dtype torch.int32"):
        check_adapter(state, reference_state)
