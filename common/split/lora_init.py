"""LoRA initialisation that does not depend on where the model is cut (per-client split points).

peft draws every LoRA A matrix from one random stream in module order, so the same block gets another A on a
part that starts elsewhere. With per-client split points a block in [K_min, K_max) lives on clients' parts and on
the server's, and every copy must start equal (ffa keeps A there for good): each A is drawn from a generator
seeded by the run's seed and the module's full-model name, with peft's own distribution (Kaiming uniform,
a=sqrt(5)); B stays at zero.
"""
from __future__ import annotations

import hashlib
import math

import torch
from peft import PeftModel
from torch import nn


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run's seed and a module's name (stable across processes and versions)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def init_lora_per_module(peft: PeftModel, seed: int, adapter: str = "default") -> int:
    """Redraw every linear LoRA A of `adapter` from (seed, module name); return how many were drawn."""
    count = 0
    for name, module in peft.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter not in lora_a:
            continue
        weight = lora_a[adapter].weight
        drawn = torch.empty(weight.shape, dtype=torch.float32)
        generator = torch.Generator().manual_seed(module_seed(seed, name))
        nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
        weight.copy_(drawn.to(weight.dtype))
        count += 1
    return count
