"""GPT-2 family: learned positions, LayerNorm, Conv1D projections, LM head tied to the token embeddings."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from common.split.base import ModelFamily, cache_keyword


class GPT2Family(ModelFamily):
    """Client: wte, wpe, h[0:K]. Server: h[K:L], ln_f, lm_head."""

    name = "gpt2"
    model_types = ("gpt2",)
    default_lora_targets = ("c_attn",)
    fan_in_fan_out = True
    layers_path = "transformer.h"
    embedding_modules = ("transformer.wte", "transformer.wpe")
    final_modules = ("transformer.ln_f", "lm_head")
    tied_head = ("lm_head.weight", "transformer.wte.weight")

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        t = model.transformer
        return t.drop(t.wte(input_ids) + t.wpe(position_ids))

    def block_context(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, cache: Any = None, first_layer: int = 0) -> dict[str, Any]:
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  position_ids=position_ids, **{cache_keyword(create_causal_mask): cache},
                                  **({"layer_idx": first_layer} if cache is not None else {}))
        return {"attention_mask": mask, "position_ids": position_ids, "cache": cache}

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        return block(hidden, context["cache"], context["attention_mask"], position_ids=context["position_ids"])

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.transformer.ln_f(hidden))
