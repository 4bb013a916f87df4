"""The common decoder layout of transformers (`model.embed_tokens`, `model.layers`, `model.rotary_emb`,
`model.norm`, `lm_head`), run with transformers' own decoder layers; a family is one declarative entry.

What differs between families that share the layout is data, not code: which attention mask each layer uses
(`config.layer_types`, or one sliding window on every layer), whether rotary tables depend on the layer type
(Gemma 3's local base for sliding layers), multipliers on the embeddings and divisors / soft-caps on the
logits (Granite, Gemma), and, for mixture-of-experts families, where each block's router is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from common.split.base import ModelFamily, UnsupportedModelError, cache_keyword
from common.split.experts import Fused, PerExpertLayout
from common.split.router import RouterSpec

FULL, SLIDING = "full_attention", "sliding_attention"
_MASKS = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}


@dataclass(frozen=True, eq=False)
class DecoderFamily(ModelFamily):
    """Client: embed_tokens, layers[0:K]. Server: layers[K:L], norm, lm_head. Both: rotary_emb.

    Config attributes named here are read at run time: `embedding_multiplier` multiplies the embeddings,
    `logits_divisor` divides the logits, `logit_softcap` caps them (c * tanh(logits / c)) when the config sets it.
    """

    name: str
    model_types: tuple[str, ...]
    default_lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    window_every_layer: bool = False       # one sliding window on every layer when `config.sliding_window` is set
    rotary_per_layer_type: bool = False    # rotary tables computed per layer type (Gemma 3)
    embedding_multiplier: str | None = None
    logits_divisor: str | None = None
    logit_softcap: str | None = None
    router: RouterSpec | None = None       # a block's router (mixture of experts), for the auxiliary loss
    experts: PerExpertLayout | None = None  # how checkpoints save the fused expert weights

    layers_path = "model.layers"
    embedding_modules = ("model.embed_tokens",)
    final_modules = ("model.norm", "lm_head")
    tied_head = ("lm_head.weight", "model.embed_tokens.weight")

    def check_config(self, config: Any) -> None:
        """Refuse options of this family the split does not reproduce."""
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{self.name}: use_bidirectional_attention is not supported")

    def checkpoint_source(self, name: str, config: Any) -> Fused | str | None:
        return self.experts.source(name, int(config.num_local_experts)) if self.experts else None

    def layer_kinds(self, config: Any) -> list[str]:
        """The attention mask kind of every layer (`full_attention` or `sliding_attention`)."""
        if self.window_every_layer:
            kind = FULL if getattr(config, "sliding_window", None) is None else SLIDING
            return [kind] * self.num_layers(config)
        kinds = getattr(config, "layer_types", None)
        return list(kinds) if kinds else [FULL] * self.num_layers(config)

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = model.model.embed_tokens(input_ids)  # Gemma's scaled embedding applies its normalizer itself
        if self.embedding_multiplier is not None:
            hidden = hidden * getattr(model.config, self.embedding_multiplier)
        return hidden

    def block_context(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, cache: Any = None, first_layer: int = 0) -> dict[str, Any]:
        self.check_config(model.config)
        kinds = self.layer_kinds(model.config)
        unknown = sorted(set(kinds) - set(_MASKS))
        if unknown:
            raise UnsupportedModelError(f"{self.name}: layer types {unknown} are not supported")
        args = dict(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                    position_ids=position_ids, **{cache_keyword(create_causal_mask): cache})
        # the first layer of each kind this part runs: where the cache holds this part's keys of that kind
        first = {kind: kinds.index(kind, first_layer) for kind in set(kinds[first_layer:])}
        masks = {kind: _MASKS[kind](**args, **({"layer_idx": first[kind]} if kind in first and cache is not None
                                               else {})) for kind in set(kinds)}
        rotary = model.model.rotary_emb
        if self.rotary_per_layer_type:
            tables = {kind: rotary(hidden, position_ids, kind) for kind in set(kinds)}
        else:
            tables = dict.fromkeys(set(kinds), rotary(hidden, position_ids))
        return {"masks": [masks[k] for k in kinds], "position_ids": position_ids, "cache": cache,
                "position_embeddings": [tables[k] for k in kinds]}

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        i, cache = block.self_attn.layer_idx, context["cache"]
        return block(hidden, attention_mask=context["masks"][i], position_ids=context["position_ids"],
                     position_embeddings=context["position_embeddings"][i],
                     **({} if cache is None else {cache_keyword(type(block).forward): cache}))

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(model.model.norm(hidden))
        if self.logits_divisor is not None:
            logits = logits / getattr(model.config, self.logits_divisor)
        cap = getattr(model.config, self.logit_softcap, None) if self.logit_softcap else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
