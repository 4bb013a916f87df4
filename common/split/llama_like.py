"""Llama-like decoders (Llama, Qwen2, Mistral): rotary positions, RMSNorm, grouped-query attention.

They share one layout in transformers (`model.embed_tokens`, `model.layers`, `model.rotary_emb`,
`model.norm`, `lm_head`) and differ only in which attention mask each layer uses.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from common.split.base import ModelFamily, UnsupportedModelError
from common.split.masking import build_mask

FULL, SLIDING = "full_attention", "sliding_attention"
_MASKS = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}


class LlamaLikeFamily(ModelFamily):
    """Client: embed_tokens, layers[0:K]. Server: layers[K:L], norm, lm_head. Both: rotary_emb."""

    default_lora_targets = ("q_proj", "v_proj")
    layers_path = "model.layers"
    embedding_modules = ("model.embed_tokens",)
    final_modules = ("model.norm", "lm_head")
    tied_head = ("lm_head.weight", "model.embed_tokens.weight")

    def layer_kinds(self, config: Any) -> list[str]:
        """The attention mask kind of every layer (`full_attention` or `sliding_attention`)."""
        return [FULL] * self.num_layers(config)

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(input_ids)

    def block_context(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, cache: Any = None, first_layer: int = 0) -> dict[str, Any]:
        kinds = self.layer_kinds(model.config)
        unknown = sorted(set(kinds) - set(_MASKS))
        if unknown:
            raise UnsupportedModelError(f"{self.name}: layer types {unknown} are not supported")
        args = dict(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                    position_ids=position_ids)
        # the first layer of each kind this part runs: where the cache holds this part's keys of that kind
        first = {kind: kinds.index(kind, first_layer) for kind in set(kinds[first_layer:])}
        masks = {kind: build_mask(_MASKS[kind], cache, **args, **({"layer_idx": first[kind]}
                                                                   if kind in first and cache is not None else {}))
                 for kind in set(kinds)}
        return {"masks": [masks[k] for k in kinds], "position_ids": position_ids, "cache": cache,
                "position_embeddings": model.model.rotary_emb(hidden, position_ids)}

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        # the cache positionally: its keyword is `past_key_values` or `cache`, depending on the transformers version
        return block(hidden, context["masks"][block.self_attn.layer_idx], context["position_ids"], context["cache"],
                     position_embeddings=context["position_embeddings"])

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.model.norm(hidden))


class LlamaFamily(LlamaLikeFamily):
    """Llama: every layer attends causally over the whole sequence."""

    name = "llama"
    model_types = ("llama",)


class MistralFamily(LlamaLikeFamily):
    """Mistral: every layer uses the sliding window when the config sets one."""

    name = "mistral"
    model_types = ("mistral",)

    def layer_kinds(self, config: Any) -> list[str]:
        kind = FULL if getattr(config, "sliding_window", None) is None else SLIDING
        return [kind] * self.num_layers(config)


class Qwen2Family(LlamaLikeFamily):
    """Qwen2: per-layer mask kinds from `config.layer_types` (sliding above `max_window_layers` if enabled)."""

    name = "qwen2"
    model_types = ("qwen2",)

    def layer_kinds(self, config: Any) -> list[str]:
        kinds = getattr(config, "layer_types", None)
        return list(kinds) if kinds else super().layer_kinds(config)
