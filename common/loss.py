"""The training objective: next-token cross-entropy over labelled positions, with label smoothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
                   ) -> tuple[torch.Tensor, int]:
    """Mean loss of predicting labels[t+1] from position t, and the number of target tokens."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    tokens = int((shift_labels != IGNORE_INDEX).sum())
    if tokens == 0:
        return shift_logits.sum() * 0.0, 0
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    return loss, tokens
