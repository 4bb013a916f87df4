"""`splitlora-server export` reads what the adapters were trained with from their headers: no repeated flags, and
inconsistent inputs are refused with the reason (options given that differ, mixed split layers, another model)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common.config.sections import ModelOptions
from common.fingerprint import compute_fingerprint
from common.lora import adapter_state, write_adapter_file
from common.plan import options_json
from common.provenance import provenance, read_provenance
from common.split.parts import SplitPart
from splitlora_server.cli import main

TARGETS = ["c_attn", "c_fc"]


def _write_part(out: Path, model_dir: Path, side: str, split: int, r: int = 4, targets=TARGETS,
                stamp: bool = True) -> Path:
    """One side's adapter file as a run writes it (random LoRA B, so that the values mean something)."""
    options = ModelOptions(model=str(model_dir), split_layer=split, lora_r=r, lora_targets=list(targets))
    part = SplitPart(model_dir, side, split, options.lora_settings(), lora_seed=3)
    with torch.no_grad():
        for name, param in part.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    made = provenance(side, compute_fingerprint(model_dir, split, options.lora_settings()), options_json(options),
                      str(model_dir))
    path = out / f"{side}-{split}-r{r}.safetensors"
    write_adapter_file(path, adapter_state(part.peft), made.to_metadata() if stamp else None)
    return path


def _export(client: Path, server: Path, out: Path, *flags: str) -> int:
    return main(["export", "--client-adapter", str(client), "--server-adapter", str(server), "--output", str(out),
                 *flags])


@pytest.fixture(scope="module")
def files(builtin_model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("adapters")
    return {"client": _write_part(out, builtin_model_dir, "client", 3),
            "server": _write_part(out, builtin_model_dir, "server", 3)}


def test_export_needs_no_flags_and_loads_on_the_whole_model(files, builtin_model_dir: Path, tmp_path: Path) -> None:
    assert _export(files["client"], files["server"], tmp_path / "export") == 0
    weights = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    parts = {**load_file(str(files["client"])), **load_file(str(files["server"]))}
    assert weights.keys() == parts.keys() and all(torch.equal(weights[k], parts[k]) for k in parts)
    made = read_provenance(tmp_path / "export" / "adapter_model.safetensors")
    assert (made.side, made.split_layer, made.base_model) == ("model", 3, str(builtin_model_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_model_dir), tmp_path / "export")
    assert sum("lora_" in n for n, _ in model.named_parameters()) == len(weights)
    assert _export(files["client"], files["server"], tmp_path / "pinned", "--lora-r", "4", "--split-layer", "3",
                   "--lora-targets", "c_attn,c_fc") == 0  # options that agree are fine


@pytest.mark.parametrize("flags, named", [(["--lora-r", "8"], "--lora-r is 4 in the adapters, 8 in the command line"),
                                          (["--lora-targets", "c_attn"], "--lora-targets is c_attn,c_fc in the adapters"),
                                          (["--split-layer", "2"], "--split-layer is 3 in the adapters")])
def test_options_that_differ_from_the_adapters_are_refused(files, tmp_path: Path, capsys, flags, named) -> None:
    assert _export(files["client"], files["server"], tmp_path / "export", *flags) == 1
    assert named in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_mixed_split_layers_are_refused(files, builtin_model_dir: Path, tmp_path: Path, capsys) -> None:
    client2 = _write_part(tmp_path, builtin_model_dir, "client", 2)
    assert _export(client2, files["server"], tmp_path / "export") == 1
    err = capsys.readouterr().err
    assert "different split layers" in err and f"{client2} was trained with split layer 2, {files['server']} with 3" in err
    # without headers (files from before provenance), the blocks themselves show it
    bare_client, bare_server = (_write_part(tmp_path, builtin_model_dir, "client", 2, stamp=False),
                                _write_part(tmp_path, builtin_model_dir, "server", 3, stamp=False))
    assert _export(bare_client, bare_server, tmp_path / "export", "--lora-targets", "c_attn,c_fc") == 1
    assert "not of split layer 3" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_another_model_is_refused(files, tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    other_client = _write_part(tmp_path, tiny_gpt2_dir, "client", 3)
    assert _export(other_client, files["server"], tmp_path / "export") == 1
    assert "different models" in capsys.readouterr().err
    assert _export(files["client"], files["server"], tmp_path / "export", "--model", str(tiny_gpt2_dir)) == 1
    assert f"--model {tiny_gpt2_dir} is not the model the adapters were trained on" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_wrong_rank_without_headers_is_refused_by_the_layout(builtin_model_dir: Path, tmp_path: Path, capsys) -> None:
    client, server = (_write_part(tmp_path, builtin_model_dir, side, 3, r=8, stamp=False)
                      for side in ("client", "server"))
    assert _export(client, server, tmp_path / "export", "--lora-targets", "c_attn,c_fc") == 1  # default r is 4
    err = capsys.readouterr().err
    assert "has shape (8, 128), expected (4, 128)" in err and "LoRA r=4" in err
    assert not (tmp_path / "export").exists()
