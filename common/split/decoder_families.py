"""Every family that follows transformers' common decoder layout, one declarative entry each.

Each entry was checked against the family's `modeling_<family>.py` (transformers 5.24): the masks its model
builds per layer, its rotary tables, and what its causal-LM head does to the embeddings and logits.
"""
from __future__ import annotations

from common.split.decoder import DecoderFamily
from common.split.experts import PerExpertLayout
from common.split.router import RouterSpec

DECODER_FAMILIES: tuple[DecoderFamily, ...] = (
    DecoderFamily("llama", ("llama",)),
    DecoderFamily("qwen2", ("qwen2",)),                          # sliding layers from config.layer_types
    DecoderFamily("mistral", ("mistral",), window_every_layer=True),
    DecoderFamily("qwen3", ("qwen3",)),
    DecoderFamily("gemma2", ("gemma2",), logit_softcap="final_logit_softcapping"),  # alternating sliding/global
    DecoderFamily("gemma3_text", ("gemma3_text",), rotary_per_layer_type=True,   # local rotary base when sliding
                  logit_softcap="final_logit_softcapping"),
    DecoderFamily("phi3", ("phi3",), default_lora_targets=("qkv_proj",), window_every_layer=True),  # fused qkv
    DecoderFamily("olmo2", ("olmo2",)),
    DecoderFamily("granite", ("granite",), embedding_multiplier="embedding_multiplier",
                  logits_divisor="logits_scaling"),           # residual/attention multipliers live in the blocks
    DecoderFamily("mixtral", ("mixtral",), window_every_layer=True, router=RouterSpec(),
                  experts=PerExpertLayout()),
)
