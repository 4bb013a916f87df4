"""The whole (unsplit) model with LoRA: the initial adapter every method starts from, and the validation loss."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from common.data import Encoded, collate
from common.lora import AdapterState, adapter_state, load_adapter_state
from common.loss import causal_lm_loss
from common.split import family_for
from common.split.parts import LoraSettings, SplitPart


def full_model(model: Path, lora: LoraSettings) -> PeftModel:
    """The unsplit model with LoRA adapters (frozen base), as CenLoRA and FedLoRA train it."""
    base = AutoModelForCausalLM.from_pretrained(str(model))
    return get_peft_model(base, lora.peft_config(family_for(base.config.model_type)))


def initial_adapter(model: Path, split_layer: int, lora: LoraSettings, seed: int) -> AdapterState:
    """The adapter a split run starts from (client and server parts seeded as the server's --seed does), so that
    every method starts from the same weights."""
    state: AdapterState = {}
    for side in ("client", "server"):
        state.update(adapter_state(SplitPart(model, side, split_layer, lora, lora_seed=seed).peft))
    return state


class Evaluator:
    """Mean cross-entropy (no label smoothing) over the completion tokens of held-out examples."""

    def __init__(self, model: Path, lora: LoraSettings, items: list[Encoded], pad_id: int, batch: int = 16) -> None:
        self.model = full_model(model, lora).eval()
        self.batches = [collate(items[i:i + batch], pad_id) for i in range(0, len(items), batch)]

    @torch.no_grad()
    def loss(self, state: AdapterState) -> float:
        """Validation loss of the whole-model adapter `state`."""
        load_adapter_state(self.model, state)
        total, tokens = 0.0, 0
        for b in self.batches:
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                position_ids=b["position_ids"]).logits
            loss, n = causal_lm_loss(logits, b["labels"])
            total, tokens = total + float(loss) * n, tokens + n
        return total / max(tokens, 1)


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay printable."""
    return math.exp(min(loss, 50.0))
