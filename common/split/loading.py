"""Build one segment's skeleton on the meta device and fill it with that segment's checkpoint tensors only."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from common.split import ModelFamily, family_for
from common.split.experts import Fused
from common.heap import release_freed_memory
from common.split.quantize import Rows, check_quantization, quantize_module, quantizes_by_rows
from common.split.segment import Segment, Side, SplitError, as_segment, check_split_layer  # noqa: F401 (re-exported)
from common.weights import CheckpointError, CheckpointIndex, resolve_model_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def prune(model: nn.Module, family: ModelFamily, segment: Segment) -> None:
    """Remove every module the segment does not own; kept modules keep their full-model names."""
    layers = model.get_submodule(family.layers_path)
    for path in () if segment.head else family.final_modules:
        _drop(model, path)
    for path in () if segment.embeds else family.embedding_modules:
        _drop(model, path)
    del layers[segment.end:]
    for i in range(segment.start):
        layers[i] = nn.Module()


def skeleton(config: Any, family: ModelFamily, segment: Segment) -> nn.Module:
    """One segment of the model with its parameters on the meta device (buffers such as rotary tables are real)."""
    config = copy.deepcopy(config)
    config.tie_word_embeddings = False  # each part holds one end of a tie at most; the head is loaded explicitly
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    prune(model, family, segment)
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


def _source(name: str, config: Any, model: nn.Module, family: ModelFamily, index: CheckpointIndex,
            tied: bool) -> str | Fused:
    """The checkpoint tensor(s) that hold parameter `name`: its own (or aliased) name, else the family's source."""
    try:
        return checkpoint_name(name, model, family, index, tied)
    except CheckpointError:
        other = family.checkpoint_source(name, config)
        parts = [other] if isinstance(other, str) else list(other.parts) if other is not None else []
        if not parts or any(p not in index for p in parts):
            raise
        return other


def _side_names(config: Any, family: ModelFamily, index: CheckpointIndex, model: nn.Module) -> dict[str, str | Fused]:
    tied = family.ties_head(config)
    return {n: _source(n, config, model, family, index, tied) for n, _ in model.named_parameters()}


def _tensor_names(sources: dict[str, str | Fused]) -> list[str]:
    return sorted({p for s in sources.values() for p in ([s] if isinstance(s, str) else s.parts)})


def side_tensor_names(model_dir: str | Path, part: Side | Segment, split_layer: int | None = None) -> list[str]:
    """Checkpoint names of the tensors one side (or segment) loads (computed without loading anything)."""
    config = load_config(model_dir)
    family = family_for(config.model_type)
    model = skeleton(config, family, as_segment(part, split_layer, family.num_layers(config)))
    return _tensor_names(_side_names(config, family, CheckpointIndex(model_dir), model))


def _build(source: str | Fused, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors[source] if isinstance(source, str) else source.build([tensors[p] for p in source.parts])


def _weight_rows(module: nn.Module, prefix: str, source: str | Fused | None, index: CheckpointIndex,
                 dtype: torch.dtype, quantization: str) -> Rows | None:
    """The weight of a module the project's int8 quantizes, as row ranges read from the checkpoint (so the float
    tensor, the embedding table included, is never resident whole); None where it is loaded as a whole."""
    if not isinstance(source, str) or not quantizes_by_rows(module, prefix, quantization):
        return None
    shape = index.tensors[source].shape
    if len(shape) != 2:
        return None
    return Rows(lambda a, b: index.read_rows(source, a, b, dtype), (shape[0], shape[1]), dtype)


def _load_quantized(model: nn.Module, sources: dict[str, str | Fused], index: CheckpointIndex, dtype: torch.dtype,
                    quantization: str) -> None:
    """Fill `model` module by module from copies of its tensors, quantizing each frozen Linear/Embedding right
    away (the project's int8 from chunks of rows); the heap's freed pages go back to the OS after each module, so
    at most one chunk or module of float weights is resident, and no mapping of the checkpoint is made."""
    for prefix, module in list(model.named_modules()):
        rows = _weight_rows(module, prefix, sources.get(f"{prefix}.weight" if prefix else "weight"), index, dtype,
                            quantization)
        for name, _ in list(module.named_parameters(recurse=False)):
            if rows is not None and name == "weight":
                continue  # quantize_module reads it in rows
            source = sources[f"{prefix}.{name}" if prefix else name]
            parts = [source] if isinstance(source, str) else list(source.parts)
            value = _build(source, {p: index.read(p, dtype) for p in parts})
            setattr(module, name, nn.Parameter(value, requires_grad=False))
        quantize_module(model, prefix, quantization, rows)
        release_freed_memory()


def load_segment(model_dir: str | Path, config: Any, family: ModelFamily, segment: Segment, dtype: torch.dtype,
                 device: torch.device, quantization: str = "none") -> nn.Module:
    """The pruned model of one segment with its base weights read from the checkpoint straight onto `device`
    (with a `quantization` other than "none", its frozen Linear/Embedding weights quantized as they are read)."""
    index = CheckpointIndex(model_dir)
    model = skeleton(config, family, segment)
    sources = _side_names(config, family, index, model)
    if quantization != "none":
        check_quantization(quantization, str(device))
        _load_quantized(model, sources, index, dtype, quantization)
    else:
        loaded = index.load(_tensor_names(sources), dtype, device)
        model.load_state_dict({n: _build(s, loaded) for n, s in sources.items()}, strict=False, assign=True)
    if any(p.is_meta for p in model.parameters()):
        raise CheckpointError(f"{model_dir}: some weights of {segment} were not in the checkpoint")
    return model.to(device).requires_grad_(False)  # buffers (rotary tables) follow the weights
