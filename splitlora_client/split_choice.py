"""Which split layer this client trains with: the server's default, one pinned with `--split-layer K` (inside the
server's `--split-range`), or `--split-layer auto`: the largest K in the range whose client-side memory fits
`--max-memory`.

The estimate counts what the client holds while it trains at the plan's batch size and sequence length: the
frozen base (embeddings and blocks [0, K)) in its dtype; the LoRA weights, their gradients and AdamW's two moments
(float32); and the float32 activations the backward pass keeps per block: about 6 x hidden + 2 x the MLP width
values per token, and two attention maps (heads x seq x seq) per sequence. It is an estimate (allocator overhead,
the Python process and the tokenizer are not in it): leave room.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.adapter_layout import adapter_layout
from common.config.engine import ConfigError
from common.split import family_for
from common.split.loading import DTYPES, load_config, skeleton
from common.split.lora_settings import LoraSettings
from common.split.segment import Segment

AUTO = "auto"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tb": 1000 ** 4, "tib": 1 << 40}
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_memory(text: str) -> int:
    """Bytes of a memory size such as 512MB, 2GiB, 1.5G or 123456; ConfigError otherwise."""
    match = _AMOUNT.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"max_memory: {text!r} is not a memory size (e.g. 512MB, 2GiB, 1.5G or bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_split_choice(value: Any) -> int | str | None:
    """None (the server's), an int K, or "auto"; ConfigError otherwise."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text.lstrip("-").isdigit():
        return int(text)
    raise ConfigError(f"split_layer must be a block index K or 'auto', got {value!r}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """The client-side memory of training with one split layer, in bytes (see the module docstring)."""

    split_layer: int
    base: int
    lora: int          # weights and gradients
    optimizer: int     # AdamW's two moments
    activations: int

    @property
    def total(self) -> int:
        return self.base + self.lora + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"{_mib(self.total)} (frozen base {_mib(self.base)}, LoRA and gradients {_mib(self.lora)}, optimizer "
                f"{_mib(self.optimizer)}, activations {_mib(self.activations)})")


def estimate_memory(model_dir: str | Path, split_layer: int, lora: LoraSettings, dtype: str, batch: int,
                    seq_len: int) -> MemoryEstimate:
    """The estimate for the client part of `split_layer` (nothing is loaded: the model is built on meta)."""
    config = load_config(model_dir)
    family = family_for(config.model_type)
    base = skeleton(config, family, Segment(0, split_layer, embeds=True))
    base_bytes = sum(p.numel() for p in base.parameters()) * DTYPES[dtype].itemsize
    lora_values = sum(math.prod(shape) for shape in adapter_layout(model_dir, "client", split_layer, lora).values())
    hidden = int(config.hidden_size)
    width = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 1))
    tokens = batch * seq_len
    per_block = 4 * (tokens * (6 * hidden + 2 * width) + 2 * batch * heads * seq_len * seq_len)
    activations = 4 * tokens * hidden + split_layer * per_block
    return MemoryEstimate(split_layer, base_bytes, 2 * 4 * lora_values, 2 * 4 * lora_values, activations)


def choose_split_layer(choice: int | str | None, default: int, bounds: tuple[int, int], budget: int | None,
                       estimate: Callable[[int], MemoryEstimate]) -> tuple[int, MemoryEstimate | None]:
    """The split layer to train with and, for `auto`, its memory estimate; ConfigError naming the server's range
    (a K outside it) or the smallest K's estimate (nothing fits the budget)."""
    low, high = bounds
    where = f"the server's --split-range {low}:{high}" if high > low else \
        f"the server's split layer {low} (it allows no other: no --split-range)"
    if choice is None:
        return default, None
    if choice != AUTO:
        if not low <= int(choice) <= high:
            raise ConfigError(f"--split-layer {choice} is outside {where}")
        return int(choice), None
    if budget is None:
        raise ConfigError("--split-layer auto needs --max-memory (this client's memory budget, e.g. 2GiB)")
    for k in range(high, low - 1, -1):
        found = estimate(k)
        if found.total <= budget:
            return k, found
    raise ConfigError(f"--split-layer auto: even the smallest split layer of {where} needs "
                      f"{estimate(low).describe()}, more than --max-memory {_mib(budget)}")
