"""The training objective: next-token cross-entropy over labelled positions, with label smoothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of every position t: labels[t+1], and IGNORE_INDEX at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def target_tokens(labels: torch.Tensor) -> int:
    """How many positions of `labels` (batch, seq) are predicted: labelled positions after the first."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                   normalizer: int | None = None) -> tuple[torch.Tensor, int]:
    """Mean loss of predicting labels[t+1] from position t, and the number of target tokens.

    The labels are shifted, not the logits: `logits` (batch, seq, vocab) is used as a view, never copied (a
    float32 copy of vocabulary-sized logits costs as much as the loss itself). `normalizer`: divide the summed
    loss by this many tokens instead of this batch's own count (a micro-batch's share of its step's mean loss).
    """
    targets = shifted_targets(labels.to(logits.device)).reshape(-1)
    tokens = int((targets != IGNORE_INDEX).sum())
    flat = logits.reshape(-1, logits.size(-1))
    flat = flat if flat.dtype == torch.float32 else flat.float()
    if tokens == 0:
        return flat.sum() * 0.0, 0
    if normalizer is None:
        return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing), tokens
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                            reduction="sum")
    return total / normalizer, tokens


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy (no label smoothing) over the target tokens, and their number (evaluation:
    the sums of several batches give the mean over all of them)."""
    total, tokens = causal_lm_loss(logits, labels, normalizer=1)
    return float(total.detach()), tokens
