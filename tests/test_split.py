"""The split changes nothing: client-then-server equals the unsplit peft model in loss and in every LoRA
gradient, each side holds only its own weights, and bad splits or checkpoints are refused clearly."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from common.lora import adapter_state
from common.split import UnsupportedModelError, family_for, supported_model_types
from common.split.parts import SplitError, SplitPart
from common.weights import CheckpointError
from tests.support.split_reference import (EXACT, build_parts, lora_params, model_loss, padded_batch, randomize_lora_b,
                                           split_forward_backward)

NUM_LAYERS = 4  # the tiny_gpt2_dir fixture
ATOL = 1e-5


def _block_indices(names: list[str]) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.search(r"\.h\.(\d+)\.", n))}


def _reference(model_dir: Path, *states: dict[str, torch.Tensor]):
    """The unsplit model with the same LoRA config and the union of the parts' adapters."""
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    ref = get_peft_model(base, EXACT.peft_config(family_for("gpt2")))
    merged = {k: v for state in states for k, v in state.items()}
    result = set_peft_model_state_dict(ref, merged)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    return ref.eval()


@pytest.mark.parametrize("split_layer", [1, 2, NUM_LAYERS - 1])
def test_split_equals_unsplit(tiny_gpt2_dir: Path, split_layer: int) -> None:
    client, server = build_parts(tiny_gpt2_dir, split_layer)
    randomize_lora_b(client, seed=100 + split_layer)
    randomize_lora_b(server, seed=200 + split_layer)
    client_lora, server_lora = lora_params(client.peft), lora_params(server.peft)
    ref = _reference(tiny_gpt2_dir, adapter_state(client.peft), adapter_state(server.peft))
    ref_lora = lora_params(ref)

    # (c) the parts' LoRA parameters are disjoint and together are exactly the unsplit model's
    assert not set(client_lora) & set(server_lora)
    assert set(client_lora) | set(server_lora) == set(ref_lora)
    assert _block_indices(list(client_lora)) == set(range(split_layer))
    assert _block_indices(list(server_lora)) == set(range(split_layer, NUM_LAYERS))

    batch = padded_batch(client.vocab_size, seed=split_layer)

    # (a) same loss
    split = split_forward_backward(client, server, batch)
    unsplit = model_loss(ref, batch)
    assert torch.allclose(split, unsplit.detach(), atol=ATOL, rtol=0), (split.item(), unsplit.item())
    with torch.no_grad(), ref.disable_adapter():
        assert abs(model_loss(ref, batch).item() - unsplit.item()) > 1e-3  # the adapters really take part

    # (b) same gradient for every LoRA parameter, client side through the cut
    unsplit.backward()
    for name, param in {**client_lora, **server_lora}.items():
        expected = ref_lora[name].grad
        assert param.grad is not None and expected is not None, name
        assert expected.abs().max() > 0, f"{name}: zero reference gradient makes the check vacuous"
        torch.testing.assert_close(param.grad, expected, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("split_layer", [1, 2, NUM_LAYERS - 1])
def test_each_side_holds_only_its_weights(tiny_gpt2_dir: Path, split_layer: int) -> None:
    client, server = build_parts(tiny_gpt2_dir, split_layer)
    client_names = [n for n, _ in client.named_parameters()]
    server_names = [n for n, _ in server.named_parameters()]

    assert _block_indices(client_names) == set(range(split_layer))
    assert any(".wte." in n for n in client_names) and any(".wpe." in n for n in client_names)
    assert not [n for n in client_names if ".ln_f." in n or "lm_head" in n]

    assert _block_indices(server_names) == set(range(split_layer, NUM_LAYERS))
    assert not [n for n in server_names if ".wte." in n or ".wpe." in n]
    assert any(".ln_f." in n for n in server_names) and any("lm_head" in n for n in server_names)

    assert not set(client_names) & set(server_names)
    assert not [p for p in (*client.parameters(), *server.parameters()) if p.is_meta]
    # only LoRA trains; the base stays frozen
    for part in (client, server):
        assert {n for n, p in part.named_parameters() if p.requires_grad} == \
            {n for n, _ in part.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("split_layer", [0, NUM_LAYERS, -1])
def test_split_layer_out_of_range(tiny_gpt2_dir: Path, side: str, split_layer: int) -> None:
    with pytest.raises(SplitError, match=re.escape(f"split layer {split_layer} is outside [1, {NUM_LAYERS - 1}]")):
        SplitPart(tiny_gpt2_dir, side, split_layer, EXACT)


def test_directory_without_safetensors(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_gpt2_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*\.bin checkpoints are pickles"):
        SplitPart(tmp_path, "client", 1, EXACT)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json is missing"):
        SplitPart(tmp_path, "server", 1, EXACT)


def _write_config(directory: Path, model_type: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def _unsupported(model_type: str) -> str:
    """The error every unsupported model type must get: its name and the full supported list."""
    supported = supported_model_types()
    assert "gpt2" in supported
    return re.escape(f"{model_type!r} is not supported; supported model types: {', '.join(supported)}")


def test_unsupported_known_model_type(tmp_path: Path) -> None:
    """A real transformers architecture with no split implementation: named, with the supported list."""
    model_dir = _write_config(tmp_path / "bert", "bert")
    with pytest.raises(UnsupportedModelError, match=_unsupported("bert")):
        SplitPart(model_dir, "client", 1, EXACT)


def test_unsupported_unknown_model_type(tmp_path: Path) -> None:
    """A model type transformers has never heard of must get the same clear error, not transformers' own
    'update Transformers' advice."""
    model_dir = _write_config(tmp_path / "fake", "made-up-arch")
    with pytest.raises(UnsupportedModelError, match=_unsupported("made-up-arch")):
        SplitPart(model_dir, "client", 1, EXACT)
