"""Build one side's skeleton on the meta device and fill it with that side's checkpoint tensors only."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from common.split import ModelFamily, family_for
from common.weights import CheckpointError, CheckpointIndex, resolve_model_dir

Side = Literal["client", "server"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SplitError(ValueError):
    """The requested split cannot be built; the message says why."""


def check_split_layer(split_layer: int, num_layers: int) -> None:
    """Refuse split layers outside [1, L-1]."""
    if not 1 <= split_layer <= num_layers - 1:
        raise SplitError(f"split layer {split_layer} is outside [1, {num_layers - 1}]: the model has {num_layers} "
                         "blocks and each side needs at least one")


def load_config(model: str | Path) -> Any:
    """The Hugging Face config of a local model directory or hub id, with a clear error when it is missing."""
    path = resolve_model_dir(model)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a model directory: config.json is missing")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise CheckpointError(f"{config_file} is not a readable JSON object ({err})") from err
    family_for(str(model_type))  # a clear error, listing the supported types, before transformers sees it
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def _drop(model: nn.Module, path: str) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, None)


def prune(model: nn.Module, family: ModelFamily, side: Side, split_layer: int) -> None:
    """Remove every module the given side does not own; kept modules keep their full-model names."""
    layers = model.get_submodule(family.layers_path)
    if side == "client":
        for path in family.final_modules:
            _drop(model, path)
        del layers[split_layer:]
    else:
        for path in family.embedding_modules:
            _drop(model, path)
        for i in range(split_layer):
            layers[i] = nn.Module()


def skeleton(config: Any, family: ModelFamily, side: Side, split_layer: int) -> nn.Module:
    """One side of the model with its parameters on the meta device (buffers such as rotary tables are real)."""
    config = copy.deepcopy(config)
    config.tie_word_embeddings = False  # each part holds one end of a tie at most; the head is loaded explicitly
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    prune(model, family, side, split_layer)
    return model


def checkpoint_name(name: str, model: nn.Module, family: ModelFamily, index: CheckpointIndex, tied: bool) -> str:
    """The checkpoint tensor that holds parameter `name` (tied head, renamed keys, missing model prefix)."""
    candidates = [name]
    if tied and family.tied_head and name in family.tied_head:
        candidates = [family.tied_head[1], family.tied_head[0]]  # transformers ties the head to the embedding
    for ours, theirs in family.checkpoint_aliases:
        candidates += [theirs + c[len(ours):] for c in list(candidates) if c.startswith(ours)]
    prefix = getattr(model, "base_model_prefix", "") + "."
    candidates += [c[len(prefix):] for c in list(candidates) if c.startswith(prefix)]
    for cand in candidates:
        if cand in index:
            return cand
    raise CheckpointError(f"{index.model_dir}: tensor {name} not found in the checkpoint (tried {candidates})")


def _side_names(config: Any, family: ModelFamily, index: CheckpointIndex, model: nn.Module) -> dict[str, str]:
    tied = family.ties_head(config)
    return {n: checkpoint_name(n, model, family, index, tied) for n, _ in model.named_parameters()}


def side_tensor_names(model_dir: str | Path, side: Side, split_layer: int) -> list[str]:
    """Checkpoint names of the tensors one side loads (computed without loading anything)."""
    config = load_config(model_dir)
    family = family_for(config.model_type)
    check_split_layer(split_layer, family.num_layers(config))
    model = skeleton(config, family, side, split_layer)
    return sorted(set(_side_names(config, family, CheckpointIndex(model_dir), model).values()))


def load_side(model_dir: str | Path, config: Any, family: ModelFamily, side: Side, split_layer: int,
              dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The pruned model of one side with its base weights read from the checkpoint straight onto `device`."""
    index = CheckpointIndex(model_dir)
    model = skeleton(config, family, side, split_layer)
    names = _side_names(config, family, index, model)
    loaded = index.load(sorted(set(names.values())), dtype, device)
    model.load_state_dict({n: loaded[c] for n, c in names.items()}, strict=False, assign=True)
    if any(p.is_meta for p in model.parameters()):
        raise CheckpointError(f"{model_dir}: some {side} weights were not in the checkpoint")
    return model.to(device).requires_grad_(False)  # buffers (rotary tables) follow the weights
