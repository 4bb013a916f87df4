"""Random server-step inputs for engine tests: activations, mask, positions and labels from one seed."""
from __future__ import annotations

import torch

from splitlora_server.engine.jobs import Step


def random_step(client: str, seed: int, batch: int = 2, seq: int = 5, hidden: int = 32, vocab: int = 96,
                step: int | None = None, pad_from: int | None = None, ignore_first: int = 0) -> Step:
    """One step of `client` (step number `seed` unless given): the last row padded from `pad_from` on,
    the first `ignore_first` labels of every row and the padded ones ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, :ignore_first] = -100
    labels[mask == 0] = -100
    return Step(client, seed if step is None else step, torch.randn(batch, seq, hidden, generator=g), mask,
                      (mask.cumsum(-1) - 1).clamp(min=0), labels)
