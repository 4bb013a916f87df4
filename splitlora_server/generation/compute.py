"""Forward-only computations of the server part for generation and evaluation (run on the engine thread).

`run_steps` computes the steps of one or more sessions: a session alone with its own cache, or the decode steps
of several sessions (one new position each) stacked in one forward: their caches are left-padded to one length,
the new keys and values are appended to each session's own cache afterwards. Padded positions are masked out, so
every row sees exactly its own positions. `score` is the loss of labelled activations without a backward.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from common.lora import load_adapter_state
from common.loss import IGNORE_INDEX
from common.split.parts import SplitPart


@dataclass
class StepInput:
    """The decoded tensors of one session step."""

    hidden: torch.Tensor          # (rows, new, hidden)
    attention_mask: torch.Tensor  # (rows, cached + new)
    position_ids: torch.Tensor    # (rows, new)
    reorder: torch.Tensor | None  # (rows,) or None


@dataclass
class StepOutput:
    """The last position's output of each row: logits with the head, else hidden states."""

    last: torch.Tensor            # (rows, vocab) or (rows, hidden), float32
    cache_bytes: int
    cached_tokens: int


def cache_bytes(cache: DynamicCache | None) -> int:
    """Bytes the keys and values of `cache` hold."""
    if cache is None:
        return 0
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.values is not None)


def bytes_per_position(part: SplitPart) -> int:
    """Cache bytes one position of one row costs in `part`'s blocks (keys and values of every layer)."""
    config = part.config
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or part.hidden_size // heads)
    size = torch.empty((), dtype=part.base_dtype).element_size()
    return 2 * len(part.layer_range()) * kv_heads * head_dim * size


@contextmanager
def adapter_of(part: SplitPart, adapter_name: str | None) -> Iterator[None]:
    """Run with adapter `adapter_name` active, or with LoRA off when None; eval mode and no autograd. Switching
    mode or adapter walks every module of the part (about 2 ms a step for GPT-2 small's 9 server blocks, several
    per cent of a decode step), so each is done only when needed: the part changes mode only as a whole
    (`train()`/`eval()` on the part, by training's `Slots.activate` and here)."""
    if part.training:
        part.eval()
    with torch.no_grad(), (part.peft.disable_adapter() if adapter_name is None else nullcontext()):
        if adapter_name is not None and part.peft.active_adapter != adapter_name:
            part.peft.set_adapter(adapter_name)
        yield


BOUNDARY_ADAPTER = "generation-boundary"  # holds a round-boundary snapshot for validation (see `boundary_adapter`)


def boundary_adapter(part: SplitPart, state: dict[str, torch.Tensor]) -> str:
    """Load a round-boundary snapshot of the server adapter into an adapter of its own; return its name. Training
    slots are untouched (the next training step activates its own slot again)."""
    if BOUNDARY_ADAPTER not in part.peft.peft_config:
        part.peft.add_adapter(BOUNDARY_ADAPTER, part.lora.peft_config(part.family))
    load_adapter_state(part.peft, state, BOUNDARY_ADAPTER)
    return BOUNDARY_ADAPTER


def _last_output(part: SplitPart, hidden: torch.Tensor) -> torch.Tensor:
    last = hidden[:, -1:, :]
    out = part.family.head(part.base, last) if part.segment.head else last
    return out[:, 0, :].float()


def run_one(part: SplitPart, cache: DynamicCache, step: StepInput, start: int | None = None) -> StepOutput:
    """One session's step with its own cache (created by the caller for a prefill); `start`: the client's split
    layer (see SplitPart.run_blocks)."""
    device = part.device
    if step.reorder is not None:
        cache.reorder_cache(step.reorder.to(device))
        step.reorder = None  # applied once, even if the step is retried
    hidden = part.run_blocks(step.hidden.to(device, part.base_dtype), step.attention_mask.to(device),
                             step.position_ids.to(device), cache, start)
    return StepOutput(_last_output(part, hidden), cache_bytes(cache),
                      cache.get_seq_length(part.blocks_from(start).start))


def stackable(part: SplitPart, caches: list[DynamicCache], steps: list[StepInput], start: int | None = None) -> bool:
    """Whether these decode steps (of clients with the split layer `start`) can run as one forward: one new position
    each, plain (not sliding) layers."""
    layers = part.blocks_from(start)
    return all(s.hidden.shape[1] == 1 for s in steps) and all(
        type(c.layers[i]) is DynamicLayer and c.layers[i].keys is not None for c in caches for i in layers)


def run_stacked(part: SplitPart, config, caches: list[DynamicCache], steps: list[StepInput],
                start: int | None = None) -> list[StepOutput]:
    """Decode steps of several sessions in one forward (see `stackable`); each cache grows by its new position."""
    device, layers = part.device, part.blocks_from(start)
    for cache, step in zip(caches, steps):
        if step.reorder is not None:
            cache.reorder_cache(step.reorder.to(device))
            step.reorder = None  # applied once, even if the steps are retried one by one
    lengths = [c.get_seq_length(layers[0]) for c in caches]
    longest = max(lengths)
    merged = DynamicCache(config=config)
    for i in layers:
        keys = [F.pad(c.layers[i].keys, (0, 0, longest - n, 0)) for c, n in zip(caches, lengths)]
        values = [F.pad(c.layers[i].values, (0, 0, longest - n, 0)) for c, n in zip(caches, lengths)]
        merged.update(torch.cat(keys), torch.cat(values), i)
    mask = torch.cat([F.pad(s.attention_mask.to(device), (longest + 1 - s.attention_mask.shape[1], 0))
                      for s in steps])
    hidden = torch.cat([s.hidden.to(device, part.base_dtype) for s in steps])
    positions = torch.cat([s.position_ids.to(device) for s in steps])
    out = _last_output(part, part.run_blocks(hidden, mask, positions, merged, start))
    results, row = [], 0
    for cache, step, n in zip(caches, steps, lengths):
        rows = slice(row, row + step.hidden.shape[0])
        for i in layers:
            layer = merged.layers[i]
            cache.update(layer.keys[rows, :, -1:, :], layer.values[rows, :, -1:, :], i)
        results.append(StepOutput(out[rows], cache_bytes(cache), n + 1))
        row = rows.stop
    return results


def score(part: SplitPart, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
          labels: torch.Tensor, start: int | None = None) -> tuple[float, int]:
    """Summed next-token cross-entropy (no label smoothing) and the number of target tokens; no backward. `start`:
    the client's split layer."""
    device = part.device
    logits = part(hidden.to(device, part.base_dtype), attention_mask.to(device), position_ids.to(device),
                  start=start)
    shift_logits, shift_labels = logits[:, :-1, :].float(), labels[:, 1:].to(device)
    tokens = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), tokens
