"""GPT-NeoX family (Pythia and friends): partial rotary positions, LayerNorm, fused QKV, untied head."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from common.split.base import ModelFamily, cache_keyword


class GPTNeoXFamily(ModelFamily):
    """Client: embed_in, layers[0:K]. Server: layers[K:L], final_layer_norm, lm_head. Both: rotary_emb."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    default_lora_targets = ("query_key_value",)
    layers_path = "gpt_neox.layers"
    embedding_modules = ("gpt_neox.embed_in",)
    final_modules = ("gpt_neox.final_layer_norm", "lm_head")
    tied_head = ("lm_head.weight", "gpt_neox.embed_in.weight")
    checkpoint_aliases = (("lm_head.", "embed_out."),)  # the name Pythia checkpoints (and save_pretrained) use

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        body = model.gpt_neox
        return body.emb_dropout(body.embed_in(input_ids))

    def block_context(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, cache: Any = None, first_layer: int = 0) -> dict[str, Any]:
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  position_ids=position_ids, **{cache_keyword(create_causal_mask): cache},
                                  **({"layer_idx": first_layer} if cache is not None else {}))
        return {"attention_mask": mask, "position_ids": position_ids, "cache": cache,
                "position_embeddings": model.gpt_neox.rotary_emb(hidden, position_ids=position_ids)}

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        return block(hidden, attention_mask=context["attention_mask"], position_ids=context["position_ids"],
                     layer_past=context["cache"], position_embeddings=context["position_embeddings"])

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.gpt_neox.final_layer_norm(hidden))
