"""The interface every model family implements so a model can be cut into a client and a server part."""
from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn


@functools.cache
def cache_keyword(fn: Callable[..., Any]) -> str:
    """The keyword a transformers function or layer `forward` takes the KV cache by: `cache` in transformers 5
    (where `past_key_values` still works, with a FutureWarning), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


class UnsupportedModelError(ValueError):
    """The checkpoint's model family (or one of its options) has no split implementation."""


class ModelFamily(ABC):
    """How to cut one family of causal LMs: where its embeddings, blocks and head live, and how to run them.

    Module paths are the full model's, so parameter names on each side are the unsplit model's names.
    Modules listed in neither `embedding_modules` nor `final_modules` nor the blocks (rotary tables,
    dropout) stay on both sides; they must hold no checkpoint tensors.
    """

    name: str
    model_types: tuple[str, ...]
    default_lora_targets: tuple[str, ...]
    fan_in_fan_out: bool = False
    layers_path: str                       # e.g. "transformer.h"
    embedding_modules: tuple[str, ...]     # modules the client holds before the blocks
    final_modules: tuple[str, ...]         # modules the server holds after the blocks
    tied_head: tuple[str, str] | None = None  # (head weight, embedding weight), used when the config ties them
    checkpoint_aliases: tuple[tuple[str, str], ...] = ()  # (model name prefix, prefix some checkpoints use)

    @abstractmethod
    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> hidden states entering block 0."""

    @abstractmethod
    def block_context(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, cache: Any = None, first_layer: int = 0) -> dict[str, Any]:
        """Keyword arguments every block needs (causal+padding mask, positions, rotary tables), rebuilt on
        each side from the attention mask and position ids alone.

        With a KV `cache` (transformers' `DynamicCache`, layers indexed as in the whole model; `first_layer`:
        the first block this part runs), `hidden` and `position_ids` cover only the new tokens and
        `attention_mask` the cached and new ones; the context carries the cache to `run_block`."""

    @abstractmethod
    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        """Run one block (appending its keys and values to `context["cache"]` when there is one)."""

    @abstractmethod
    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states after the last block -> logits."""

    def num_layers(self, config: Any) -> int:
        """Number of transformer blocks in the full model."""
        return int(config.num_hidden_layers)

    def checkpoint_source(self, name: str, config: Any) -> Any:
        """Where a checkpoint that lacks parameter `name` under its own name keeps it: another name, a `Fused`
        (several tensors built into one, e.g. per-expert weights), or None (nowhere else)."""
        return None

    def ties_head(self, config: Any) -> bool:
        """Whether this checkpoint's LM head is the token embedding matrix."""
        return self.tied_head is not None and bool(getattr(config, "tie_word_embeddings", False))
