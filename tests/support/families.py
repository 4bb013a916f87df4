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
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig,
                          GraniteConfig, LlamaConfig, MistralConfig, MixtralConfig, Olmo2Config, Phi3Config,
                          PreTrainedConfig, Qwen2Config, Qwen3Config)

from common.split import family_for
from common.split.parts import LoraSettings, load_config
from tests.support.split_reference import (EXACT, build_parts, lora_params, model_loss, randomize_lora_b,
                                          split_forward_backward)

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
            "granite", "mixtral")
NUM_LAYERS = 4
VOCAB = 96
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                num_attention_heads=4, max_position_embeddings=64)
_ALTERNATING = ["sliding_attention", "full_attention"] * (NUM_LAYERS // 2)
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
    return _new_family_config(family)


def _new_family_config(family: str) -> PreTrainedConfig:
    """The families of the generic decoder path, each with the options its split must reproduce switched on."""
    if family == "qwen3":  # q/k norms, sliding window on layers 2 and 3
        return Qwen3Config(**_DECODER, num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=4,
                           max_window_layers=2)
    if family == "gemma2":  # scaled tied embeddings, alternating sliding/global layers, attention and logit caps
        return Gemma2Config(**_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                            final_logit_softcapping=2.0, attn_logit_softcapping=5.0)
    if family == "gemma3_text":  # as Gemma 2, plus a local rotary base on the sliding layers
        return Gemma3TextConfig(**_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                layer_types=_ALTERNATING, query_pre_attn_scalar=8, final_logit_softcapping=2.0)
    if family == "phi3":  # fused qkv_proj / gate_up_proj, sliding window on every layer
        return Phi3Config(**_DECODER, num_key_value_heads=2, sliding_window=4, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    if family == "olmo2":  # norms after attention and MLP, q/k norms
        return Olmo2Config(**_DECODER, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "granite":  # embedding, residual, attention and logit multipliers away from 1
        return GraniteConfig(**_DECODER, num_key_value_heads=2, embedding_multiplier=4.0, residual_multiplier=0.8,
                             attention_multiplier=0.2, logits_scaling=0.5)
    if family == "mixtral":  # 4 experts, top-2, router auxiliary loss on
        return MixtralConfig(**_DECODER, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             output_router_logits=True, router_aux_loss_coef=0.5)
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


def assert_split_equals_unsplit(model_dir: Path, batch: dict[str, torch.Tensor], split_layers: range | list[int],
                                lora: LoraSettings = EXACT) -> None:
    """Loss and every LoRA gradient of client+server equal the unsplit peft model's at each split layer, and the
    two parts together hold exactly the unsplit model's LoRA parameters."""
    ref = reference(model_dir, lora)
    expected = model_loss(ref, batch)
    expected.backward()
    ref_grads = {n: p.grad for n, p in lora_params(ref).items()}
    for split_layer in split_layers:
        client, server = build_parts(model_dir, split_layer, lora)
        copy_adapter(ref, client, server)
        loss = split_forward_backward(client, server, batch)
        grads = {n: p.grad for part in (client, server) for n, p in lora_params(part.peft).items()}
        assert set(grads) == set(ref_grads), f"{model_dir.name} at {split_layer}: LoRA parameters differ"
        torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5,
                                       msg=f"{model_dir.name} split at {split_layer}: {name}")
