"""Build one side of the split model from a local checkpoint, holding only that side's weights."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from common.checkpoint import CheckpointError, CheckpointIndex
from common.split import ModelFamily, family_for

Side = Literal["client", "server"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SplitError(ValueError):
    """The requested split cannot be built; the message says why."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; `targets` empty means the family's defaults."""

    r: int = 4
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = field(default_factory=tuple)

    def resolved(self, family: ModelFamily) -> "LoraSettings":
        """These settings with the family's default targets filled in."""
        return LoraSettings(self.r, self.alpha, self.dropout, tuple(self.targets) or family.default_lora_targets)

    def peft_config(self, family: ModelFamily) -> LoraConfig:
        """The peft LoraConfig both sides and the exported adapter use."""
        s = self.resolved(family)
        return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.targets),
                          fan_in_fan_out=family.fan_in_fan_out, bias="none")

    def sha256(self, family: ModelFamily) -> str:
        """Hash of the resolved settings, for the handshake fingerprint."""
        data = asdict(self.resolved(family))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _drop(model: nn.Module, path: str) -> None:
    parent, _, child = path.rpartition(".")
    setattr(_get(model, parent) if parent else model, child, None)


def prune(model: nn.Module, family: ModelFamily, side: Side, split_layer: int) -> None:
    """Remove every module the given side does not own; kept modules keep their full-model names."""
    layers = _get(model, family.layers_path)
    if side == "client":
        for path in family.final_modules:
            _drop(model, path)
        del layers[split_layer:]
    else:
        for path in family.embedding_modules:
            _drop(model, path)
        for i in range(split_layer):
            layers[i] = nn.Module()


def _skeleton(config, family: ModelFamily, side: Side, split_layer: int) -> nn.Module:
    config = copy.deepcopy(config)
    config.tie_word_embeddings = False  # each part holds one end of a tie at most; the head is loaded explicitly
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    prune(model, family, side, split_layer)
    return model


def _checkpoint_name(name: str, model: nn.Module, family: ModelFamily, index: CheckpointIndex) -> str:
    candidates = [name]
    if family.tied_head and name == family.tied_head[0]:
        candidates.append(family.tied_head[1])
    prefix = getattr(model, "base_model_prefix", "") + "."
    candidates += [c[len(prefix):] for c in list(candidates) if c.startswith(prefix)]
    for cand in candidates:
        if cand in index:
            return cand
    raise CheckpointError(f"{index.model_dir}: tensor {name} not found in the checkpoint (tried {candidates})")


def load_config(model_dir: str | Path):
    """The Hugging Face config of a local model directory, with a clear error when it is missing."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model directory: config.json is missing")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def side_tensor_names(model_dir: str | Path, side: Side, split_layer: int) -> list[str]:
    """Checkpoint names of the tensors one side loads (computed without loading anything)."""
    config = load_config(model_dir)
    family = family_for(config.model_type)
    check_split_layer(split_layer, family.num_layers(config))
    index = CheckpointIndex(model_dir)
    model = _skeleton(config, family, side, split_layer)
    return sorted({_checkpoint_name(n, model, family, index) for n, _ in model.named_parameters()})


def check_split_layer(split_layer: int, num_layers: int) -> None:
    """Refuse split layers outside [1, L-1]."""
    if not 1 <= split_layer <= num_layers - 1:
        raise SplitError(f"split layer {split_layer} is outside [1, {num_layers - 1}]: the model has {num_layers} "
                         "blocks and each side needs at least one")


class SplitPart(nn.Module):
    """One side of the split model: its own blocks with LoRA adapters, nothing of the other side."""

    def __init__(self, model_dir: str | Path, side: Side, split_layer: int, lora: LoraSettings = LoraSettings(),
                 dtype: str = "float32", device: str = "cpu", lora_seed: int = 0) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise SplitError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.model_dir, self.side, self.split_layer = Path(model_dir), side, split_layer
        self.config = load_config(model_dir)
        self.family = family_for(self.config.model_type)
        self.num_layers = self.family.num_layers(self.config)
        check_split_layer(split_layer, self.num_layers)
        self.lora = lora.resolved(self.family)
        index = CheckpointIndex(model_dir)
        base = _skeleton(self.config, self.family, side, split_layer)
        names = {n: _checkpoint_name(n, base, self.family, index) for n, _ in base.named_parameters()}
        loaded = index.load(sorted(set(names.values())), DTYPES[dtype])
        base.load_state_dict({n: loaded[c] for n, c in names.items()}, strict=False, assign=True)
        if any(p.is_meta for p in base.parameters()):
            raise CheckpointError(f"{model_dir}: some {side} weights were not in the checkpoint")
        base.to(device).requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora_seed)
            self.peft = get_peft_model(base, lora.peft_config(self.family))
        self.device = torch.device(device)

    @property
    def base(self) -> nn.Module:
        """The underlying (pruned) transformers model with LoRA layers injected."""
        return self.peft.base_model.model

    def layer_range(self) -> range:
        """Indices of the blocks this side runs."""
        return range(0, self.split_layer) if self.side == "client" else range(self.split_layer, self.num_layers)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Run this side's blocks on `hidden`."""
        context = self.family.block_context(self.base, hidden, attention_mask, position_ids)
        layers = self.base.get_submodule(self.family.layers_path)
        for i in self.layer_range():
            hidden = self.family.run_block(layers[i], hidden, context)
        return hidden

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Client: token ids -> cut activations. Server: cut activations -> logits."""
        if self.side == "client":
            hidden = self.family.embed(self.base, inputs, position_ids)
            return self.run_blocks(hidden, attention_mask, position_ids)
        hidden = self.run_blocks(inputs.to(self.base_dtype), attention_mask, position_ids)
        return self.family.head(self.base, hidden)

    @property
    def base_dtype(self) -> torch.dtype:
        """dtype of the frozen base weights."""
        return next(p.dtype for p in self.base.parameters() if not p.requires_grad)

    @property
    def hidden_size(self) -> int:
        """Width of the cut activations."""
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the head scores."""
        return int(self.config.vocab_size)
