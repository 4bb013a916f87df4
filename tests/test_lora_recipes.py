"""The LoRA recipes people copy, on the split: `all-linear`, rsLoRA, DoRA, and targets on one side only (the
embeddings on the client, the head on the server). Each is split == unsplit (loss and every LoRA gradient);
a target on neither side is an error naming it; the exported adapter_config.json is the one peft writes for the
same configuration, and `AutoPeftModelForCausalLM` loads the export and computes the split pipeline's logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model
from transformers import AutoModelForCausalLM

from common.lora import ADAPTER_CONFIG, adapter_state, export_adapter, write_adapter_file
from common.split import family_for
from common.split.lora_settings import LoraSettings, LoraTargetError, whole_model_lora_config
from common.split.parts import SplitPart, load_config
from splitlora_server.export import export
from splitlora_server.options import ExportConfig
from tests.support.families import VOCAB, assert_split_equals_unsplit, checkpoint_dir, copy_adapter, reference
from tests.support.split_reference import build_parts, padded_batch

BATCH = padded_batch(VOCAB, lengths=(11, 6, 9))
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
ONE_SIDED = {"gpt2": ("c_attn", "wte", "lm_head"), "llama": ("q_proj", "embed_tokens", "lm_head")}
RECIPES = {
    "all-linear": lambda fam: LoraSettings(dropout=0.0, targets=("all-linear",)),
    "rslora": lambda fam: LoraSettings(r=8, dropout=0.0, rslora=True),
    "dora": lambda fam: LoraSettings(dropout=0.0, dora=True),
    "one-sided": lambda fam: LoraSettings(dropout=0.0, targets=ONE_SIDED[fam]),
}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_split_equals_unsplit(family: str, recipe: str) -> None:
    assert_split_equals_unsplit(checkpoint_dir(family), BATCH, [1, 3], RECIPES[recipe](family))


def _adapted(part: SplitPart) -> set[str]:
    return {n.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for n, _ in part.peft.named_parameters()
            if "lora_A" in n or "lora_embedding_A" in n}


def test_all_linear_is_peft_resolution_without_the_head() -> None:
    """`all-linear` adapts every linear layer of both parts, and the head on neither (peft excludes the output)."""
    client, server = build_parts(checkpoint_dir("llama"), 2, RECIPES["all-linear"]("llama"))
    adapted = _adapted(client) | _adapted(server)
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n in adapted} == linear
    assert len(adapted) == 4 * len(linear) and not any(n.startswith("lm_head") for n in adapted)


def test_one_sided_targets_go_where_the_module_is() -> None:
    client, server = build_parts(checkpoint_dir("gpt2"), 2, RECIPES["one-sided"]("gpt2"))
    assert "transformer.wte" in _adapted(client) and "lm_head" not in _adapted(client)
    assert "lm_head" in _adapted(server) and "transformer.wte" not in _adapted(server)
    # what travels (to the aggregator, into checkpoints and the export) is the trained tensors only, not the
    # vocabulary-sized frozen matrices peft would save for embedding targets
    for part in (client, server):
        assert all("lora_" in k for k in adapter_state(part.peft))


def test_target_on_neither_side_is_named() -> None:
    lora = LoraSettings(targets=("q_proj", "no_such_proj", "c_attn"))
    with pytest.raises(LoraTargetError, match=r"\['c_attn', 'no_such_proj'\] name no module of this llama model"):
        SplitPart(checkpoint_dir("llama"), "client", 2, lora)


def test_a_side_without_any_target_is_refused() -> None:
    with pytest.raises(LoraTargetError, match="no module of the client part"):
        SplitPart(checkpoint_dir("llama"), "client", 2, LoraSettings(targets=("lm_head",)))


def test_all_linear_stands_alone() -> None:
    with pytest.raises(LoraTargetError, match="'all-linear' stands alone"):
        SplitPart(checkpoint_dir("llama"), "client", 2, LoraSettings(targets=("all-linear", "lm_head")))


def _peft_saved_config(model_dir: Path, lora: LoraSettings, out: Path) -> dict:
    family = family_for(load_config(model_dir).model_type)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora.peft_config(family))
    model.save_pretrained(str(out))
    return json.loads((out / ADAPTER_CONFIG).read_text())


@pytest.mark.parametrize(("family", "recipe"), [("gpt2", None), ("llama", None), ("llama", "all-linear"),
                                                ("gpt2", "dora"), ("llama", "rslora"), ("llama", "one-sided"),
                                                ("gpt2", "one-sided")])
def test_adapter_config_is_the_one_peft_writes(family: str, recipe: str | None, tmp_path: Path) -> None:
    """Field for field (but the base model path) what `PeftModel.save_pretrained` writes for the same config; the
    export loads with AutoPeftModelForCausalLM and gives the split pipeline's logits."""
    model_dir = checkpoint_dir(family)
    lora = RECIPES[recipe](family) if recipe else LoraSettings(dropout=0.0)
    client, server = build_parts(model_dir, 2, lora)
    copy_adapter(reference(model_dir, lora), client, server)
    exported = export_adapter(tmp_path / "export", whole_model_lora_config(lora, client.family, client.config),
                              adapter_state(client.peft), adapter_state(server.peft), base_model=str(model_dir))
    ours = json.loads((exported / ADAPTER_CONFIG).read_text())
    theirs = _peft_saved_config(model_dir, lora, tmp_path / "peft")
    for config in (ours, theirs):
        config.pop("base_model_name_or_path")
        config["target_modules"] = sorted(config["target_modules"])
    assert ours == theirs
    assert ours["task_type"] == "CAUSAL_LM" and ours["inference_mode"] is True

    loaded = AutoPeftModelForCausalLM.from_pretrained(str(exported)).eval()
    mask, pos = BATCH["attention_mask"], BATCH["position_ids"]
    with torch.no_grad():
        logits = loaded(input_ids=BATCH["input_ids"], attention_mask=mask, position_ids=pos).logits
        split = server(client(BATCH["input_ids"], mask, pos), mask, pos)
    torch.testing.assert_close(logits, split, atol=1e-5, rtol=1e-5)


def test_export_command_writes_the_recipe(tmp_path: Path) -> None:
    """`splitlora-server export --lora-targets all-linear --lora-rslora` (the command's code path): the config is
    peft's for the same recipe and the adapter loads with AutoPeftModelForCausalLM."""
    model_dir = checkpoint_dir("llama")
    lora = LoraSettings(dropout=0.0, targets=("all-linear",), rslora=True)
    client, server = build_parts(model_dir, 2, lora)
    write_adapter_file(tmp_path / "client.safetensors", adapter_state(client.peft))
    write_adapter_file(tmp_path / "server.safetensors", adapter_state(server.peft))
    out = export(ExportConfig(model=str(model_dir), client_adapter=str(tmp_path / "client.safetensors"),
                              server_adapter=str(tmp_path / "server.safetensors"), output=str(tmp_path / "export"),
                              split_layer=2, lora_dropout=0.0, lora_targets=["all-linear"], lora_rslora=True))
    ours = json.loads((out / ADAPTER_CONFIG).read_text())
    theirs = _peft_saved_config(model_dir, lora, tmp_path / "peft")
    assert ours["use_rslora"] is True and sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    AutoPeftModelForCausalLM.from_pretrained(str(out))
