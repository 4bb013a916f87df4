"""One part of the split model (`SplitPart`, a `Segment` of blocks), with LoRA where the shared settings' targets
are in its blocks."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.split import family_for
from common.split.loading import DTYPES, load_config, load_segment, side_tensor_names
from common.split.lora_init import init_lora_per_module
from common.split.lora_settings import LoraSettings, side_lora_config
from common.split.segment import Segment, Side, SplitError, as_segment, check_split_layer
from common.weights import resolve_model_dir

__all__ = ["DTYPES", "LoraSettings", "Segment", "Side", "SplitError", "SplitPart", "check_split_layer", "load_config",
           "resolve_model_dir", "side_tensor_names"]


class SplitPart(nn.Module):
    """One part of the split model: a `Segment` of blocks with LoRA adapters, nothing of the other parts.

    `part` is a Segment, or a side ("client": `Segment(0, K, embeds=True)`, "server": `Segment(K, L, head=True)`)
    with `split_layer` K. `model_dir` is a local directory or a hub id. Base weights are frozen in `dtype`; LoRA
    weights are float32. With `gradient_checkpointing`, each block's activations are recomputed in the backward.
    With `per_module_init`, each module's LoRA A is drawn from the seed and the module's name (the same on every
    part that holds the module: per-client split points, common.split.lora_init). `quantization` ("int8": see
    `common.split.quantize`) quantizes the frozen base while it is read.
    """

    def __init__(self, model_dir: str | Path, part: Side | Segment, split_layer: int | None = None,
                 lora: LoraSettings = LoraSettings(), dtype: str = "float32", device: str = "cpu", lora_seed: int = 0,
                 gradient_checkpointing: bool = False, per_module_init: bool = False,
                 quantization: str = "none") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise SplitError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if not isinstance(part, Segment) and part not in ("client", "server"):
            raise SplitError(f"side {part!r} is not 'client' or 'server'")
        self.model_dir = resolve_model_dir(model_dir)
        self.config = load_config(self.model_dir)
        self.family = family_for(self.config.model_type)
        self.num_layers = self.family.num_layers(self.config)
        self.segment = as_segment(part, split_layer, self.num_layers)
        self.lora = lora.resolved(self.family)
        self.device = torch.device(device)
        self.gradient_checkpointing = gradient_checkpointing
        base = load_segment(self.model_dir, self.config, self.family, self.segment, DTYPES[dtype], self.device,
                            quantization)
        if not self.segment.layers:  # the head alone (a u-shape client top with J = 0): nothing to adapt
            self.peft, self._plain = None, base
            return
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # peft
            warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated", UserWarning)  # nothing merges
            torch.manual_seed(lora_seed)
            self._lora_config = side_lora_config(lora, self.family, self.config, base,
                                                 f"{self.side} part, {self.segment}")
            self.peft = get_peft_model(base, self.lora_config())
        if per_module_init:
            init_lora_per_module(self.peft, lora_seed)
        for name, param in self.peft.named_parameters():
            if "lora_" in name and param.dtype != torch.float32:
                param.data = param.data.float()  # adapters train in float32 whatever the base dtype

    def lora_config(self) -> LoraConfig:
        """A fresh copy of this part's peft LoraConfig (the whole model's targets; those in this part match)."""
        return copy.deepcopy(self._lora_config)

    @property
    def side(self) -> Side:
        """"client" for a part that starts with the embeddings, else "server"."""
        return "client" if self.segment.embeds else "server"

    @property
    def split_layer(self) -> int:
        """The cut this part sits at: its end when it holds the embeddings, else its start."""
        return self.segment.end if self.segment.embeds else self.segment.start

    @property
    def base(self) -> nn.Module:
        """The underlying (pruned) transformers model with LoRA layers injected (none on the head alone)."""
        return self.peft.base_model.model if self.peft is not None else self._plain

    def layer_range(self) -> range:
        """Indices of the blocks this part runs."""
        return self.segment.layers

    def blocks_from(self, start: int | None) -> range:
        """The blocks run for a client whose split layer is `start` (None: all of this part's blocks)."""
        if start is None or start == self.segment.start:
            return self.segment.layers
        if self.segment.embeds or not self.segment.start <= start < self.segment.end:
            raise SplitError(f"cannot start at block {start}: this part runs blocks [{self.segment.start}, "
                             f"{self.segment.end})")
        return range(start, self.segment.end)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                   cache: Any = None, start: int | None = None) -> torch.Tensor:
        """Run this part's blocks on `hidden` (mask and rotary tables rebuilt here from mask and positions); with
        `start`, only blocks [start, end) (a client with its own split layer, see `blocks_from`).

        With a `cache` (a transformers `DynamicCache`, layers indexed as in the whole model), `hidden` holds only
        the new tokens, `attention_mask` covers the cached and the new tokens, and the blocks append their keys and
        values to it."""
        blocks = self.blocks_from(start)
        extra = {} if cache is None else {"cache": cache, "first_layer": blocks.start}
        context = self.family.block_context(self.base, hidden, attention_mask, position_ids, **extra)
        layers = self.base.get_submodule(self.family.layers_path)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for i in blocks:
            if recompute:
                hidden = checkpoint(self.family.run_block, layers[i], hidden, context, use_reentrant=False)
            else:
                hidden = self.family.run_block(layers[i], hidden, context)
        return hidden

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any = None, start: int | None = None) -> torch.Tensor:
        """Token ids (with the embeddings) or hidden states -> this part's blocks -> hidden states, or logits
        (with the head). `cache`, `start`: see `run_blocks`."""
        if self.segment.embeds:
            hidden = self.family.embed(self.base, inputs, position_ids)
        else:
            hidden = inputs.to(self.base_dtype)
        hidden = self.run_blocks(hidden, attention_mask, position_ids, cache, start)
        return self.family.head(self.base, hidden) if self.segment.head else hidden

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
