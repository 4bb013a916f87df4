"""Cross-client batching: stack several clients' steps into one forward/backward and split the results back.

Semantics (shared server adapter only):

- Every client in a batch sees the same server adapter weights. The combined objective is the *sum of the
  per-client mean losses*, so each client's loss and its gradient at the cut are exactly what it would get
  alone with those weights (rows of a transformer batch do not interact; padding is masked and labelled -100).
- The blocks run once over the stacked batch; the head and loss run client by client on the blocks' output, so
  only one client's logits (vocabulary-sized) are alive at a time, and one backward pass goes through the blocks.
- One optimizer step is taken on the combined gradient (clipped as a whole), and the learning-rate schedule
  advances once per client step in the batch, so it follows the configured number of client steps.
- Processed one by one, client 2 would instead see the adapter already updated by client 1. That update order
  is the only difference, and it is inherent to batching.
- Dropout masks of a batched step are drawn for the batch as a whole (seeded by its members), so with dropout
  on, a batched run is reproducible only if the same steps meet in the same batches.

Per-client adapter mode is never batched: every client has its own adapter, so no two waiting steps share one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from common.loss import IGNORE_INDEX, causal_lm_loss
from common.split.parts import SplitPart


class _Step(Protocol):
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class BatchSettings:
    """How long the engine waits for more clients' steps and how many it stacks (max_clients <= 1: off)."""

    window_ms: float = 0.0
    max_clients: int = 1

    @property
    def enabled(self) -> bool:
        """Whether steps of different clients may share one forward/backward."""
        return self.max_clients > 1


@dataclass
class Stacked:
    """Several steps padded to one length and concatenated along the batch dimension."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    spans: list[tuple[int, int, int]]  # per step: first row, end row, its own sequence length


def _pad_seq(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = (0, 0, 0, extra) if t.dim() == 3 else (0, extra)
    return F.pad(t, pad, value=value)


def stack(steps: Sequence[_Step]) -> Stacked:
    """Right-pad every step to the longest sequence (hidden 0, mask 0, position 0, label -100) and concatenate."""
    width = max(int(s.hidden.shape[1]) for s in steps)
    spans, row = [], 0
    for s in steps:
        spans.append((row, row + int(s.hidden.shape[0]), int(s.hidden.shape[1])))
        row += int(s.hidden.shape[0])
    return Stacked(
        hidden=torch.cat([_pad_seq(s.hidden, width, 0.0) for s in steps]),
        attention_mask=torch.cat([_pad_seq(s.attention_mask, width, 0) for s in steps]),
        position_ids=torch.cat([_pad_seq(s.position_ids, width, 0) for s in steps]),
        labels=torch.cat([_pad_seq(s.labels, width, IGNORE_INDEX) for s in steps]),
        spans=spans)


def forward_backward(part: SplitPart, stacked: Stacked, label_smoothing: float
                     ) -> tuple[list[tuple[float, int]], torch.Tensor, int]:
    """Blocks over the whole stack, head and loss per step, backward of the sum of the counted per-step mean
    losses (those with target tokens and a finite value). Returns each step's (loss, tokens), the gradient at the
    cut of the stack, and how many losses were counted."""
    device = part.device
    hidden = stacked.hidden.to(device).requires_grad_(True)
    out = part.run_blocks(hidden.to(part.base_dtype), stacked.attention_mask.to(device),
                          stacked.position_ids.to(device))
    top = out.detach().requires_grad_(True)
    labels, results, counted = stacked.labels.to(device), [], 0
    for a, b, t in stacked.spans:
        loss, tokens = causal_lm_loss(part.family.head(part.base, top[a:b, :t]), labels[a:b, :t], label_smoothing)
        if tokens and torch.isfinite(loss):
            loss.backward()  # frees this step's logits before the next step's are made
            counted += 1
        results.append((float(loss.detach()), tokens))
    if counted:
        out.backward(top.grad)
    return results, hidden.grad if hidden.grad is not None else torch.zeros_like(hidden), counted


def split_rows(stacked_grad: torch.Tensor, spans: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Each step's part of a stacked tensor, without the padding added by `stack`."""
    return [stacked_grad[a:b, :t].contiguous() for a, b, t in spans]
