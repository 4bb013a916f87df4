"""Tiny random checkpoints of every split family, written with `save_pretrained` and loaded back through the
real path, plus helpers to give a split part the same adapter values as an unsplit reference."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          PreTrainedConfig, Qwen2Config)

from common.split import family_for
from common.split.parts import LoraSettings, load_config
from tests.support.split_reference import randomize_lora_b

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox")
NUM_LAYERS = 4
VOCAB = 96
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4, max_position_embeddings=64)
_ROOT = Path(tempfile.mkdtemp(prefix="splitlora-families-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def tiny_config(family: str) -> PreTrainedConfig:
    """A 4-block, 32-wide config without dropout; windows of 4 tokens where the family has sliding attention."""
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "llama":  # grouped-query attention, untied head
        return LlamaConfig(**_DECODER, num_key_value_heads=2)
    if family == "qwen2":  # tied head (as in the small Qwen2 models), sliding window on layers 2 and 3
        return Qwen2Config(**_DECODER, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                           sliding_window=4, max_window_layers=2)
    if family == "mistral":  # sliding window on every layer
        return MistralConfig(**_DECODER, num_key_value_heads=1, sliding_window=4)
    if family == "gpt_neox":  # partial rotary, parallel residual, head saved as `embed_out`
        return GPTNeoXConfig(**_DECODER, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0)
    raise ValueError(family)


@functools.cache
def checkpoint_dir(family: str, sharded: bool = False) -> Path:
    """The family's tiny checkpoint (seeded, so the sharded copy holds the same values as the single file)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(tiny_config(family))
    path = _ROOT / f"{family}-{'sharded' if sharded else 'single'}"
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "20KB"} if sharded else {}))
    return path


def reference(model_dir: Path, lora: LoraSettings, seed: int = 5) -> PeftModel:
    """The unsplit model with LoRA (non-zero B), in eval mode."""
    family = family_for(load_config(model_dir).model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora.peft_config(family))
    randomize_lora_b(model, seed)
    return model.eval()


def copy_adapter(src: nn.Module, *parts: nn.Module) -> None:
    """Give each part's LoRA parameters the values of the same-named parameters of `src`."""
    values = dict(src.named_parameters())
    with torch.no_grad():
        for part in parts:
            for name, param in part.peft.named_parameters():
                if "lora_" in name:
                    param.copy_(values[name])
