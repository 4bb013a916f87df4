"""Shared helpers for the split tests: a padded batch, both parts of a split, and split / unsplit passes."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from common.data import IGNORE_INDEX, collate
from common.loss import causal_lm_loss
from common.split.parts import LoraSettings, SplitPart

EXACT = LoraSettings(dropout=0.0)  # no LoRA dropout: split and unsplit must agree exactly
LORA_SEED = 7


def padded_batch(vocab_size: int, lengths: tuple[int, ...] = (11, 6), context: int = 3,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch of random sequences of different lengths; labels are -100 on a context prefix
    (and, from `collate`, on the padding)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        ids = torch.randint(1, vocab_size, (n,), generator=gen).tolist()
        items.append((ids, [IGNORE_INDEX] * context + ids[context:]))
    batch = collate(items, pad_id=0)
    assert batch["attention_mask"].sum(-1).tolist() == list(lengths)
    return batch


def build_parts(model_dir: Path, split_layer: int, lora: LoraSettings = EXACT,
                seed: int = LORA_SEED) -> tuple[SplitPart, SplitPart]:
    """Client and server parts of one split, in eval mode, with the same LoRA seed."""
    client = SplitPart(model_dir, "client", split_layer, lora, lora_seed=seed).eval()
    server = SplitPart(model_dir, "server", split_layer, lora, lora_seed=seed).eval()
    return client, server


def randomize_lora_b(part: nn.Module, seed: int) -> None:
    """Give every LoRA B matrix seeded non-zero values (peft starts them at zero, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(part.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    assert all(p.abs().sum() > 0 for n, p in part.named_parameters() if "lora_B" in n)


def lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable (LoRA) parameters of a peft model, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def split_forward_backward(client: SplitPart, server: SplitPart, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One split step as the protocol runs it: the server sees only detached cut activations, and the client
    back-propagates the gradient the server returns. Returns the loss (gradients are left in .grad)."""
    mask, pos = batch["attention_mask"], batch["position_ids"]
    hidden = client(batch["input_ids"], mask, pos)
    cut = hidden.detach().requires_grad_(True)
    loss, _ = causal_lm_loss(server(cut, mask, pos), batch["labels"])
    loss.backward()
    assert cut.grad is not None
    hidden.backward(cut.grad)
    return loss.detach()


@torch.no_grad()
def split_loss(client: SplitPart, server: SplitPart, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Client-then-server loss, no gradients."""
    mask, pos = batch["attention_mask"], batch["position_ids"]
    return causal_lm_loss(server(client(batch["input_ids"], mask, pos), mask, pos), batch["labels"])[0]


def model_loss(model: nn.Module | PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Loss of an unsplit Hugging Face (or peft) causal LM, with the same objective as the split."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    return causal_lm_loss(logits, batch["labels"])[0]
