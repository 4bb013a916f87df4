"""Mixture-of-experts checkpoints saved in the per-expert layout transformers writes (Mixtral's `block_sparse_moe.
experts.{e}.w1/w2/w3`), read into the fused expert tensors transformers 5 builds (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), exactly as its own weight conversion does (stack the experts, then gate before up)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Fused:
    """A model tensor built from several checkpoint tensors."""

    parts: tuple[str, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor]


def _gate_up(num_experts: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda ts: torch.cat([torch.stack(ts[:num_experts]), torch.stack(ts[num_experts:])], dim=1)


@dataclass(frozen=True)
class PerExpertLayout:
    """Where a family's per-expert checkpoint keeps what the model holds fused (the names from `conversion_mapping`)."""

    moe_module: str = "block_sparse_moe"   # the checkpoint's name for the block's `mlp`
    gate: str = "w1"
    up: str = "w3"
    down: str = "w2"

    def source(self, name: str, num_experts: int) -> Fused | str | None:
        """The checkpoint tensor(s) for model parameter `name`, or None when it is not an expert-block tensor."""
        m = re.fullmatch(r"(.*\.)mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)", name)
        if m is None:
            return None
        prefix, what = m.group(1) + self.moe_module + ".", m.group(2)
        if what == "gate.weight":
            return prefix + "gate.weight"
        experts = range(num_experts)
        if what == "experts.down_proj":
            return Fused(tuple(f"{prefix}experts.{e}.{self.down}.weight" for e in experts), torch.stack)
        names = [f"{prefix}experts.{e}.{w}.weight" for w in (self.gate, self.up) for e in experts]
        return Fused(tuple(names), _gate_up(num_experts))
