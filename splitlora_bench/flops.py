"""FLOPs of one training step, counted by torch's FlopCounterMode on a probe batch of typical shape."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from peft import PeftModel
from torch.utils.flop_counter import FlopCounterMode

from common.loss import causal_lm_loss
from common.split.parts import SplitPart


@dataclass(frozen=True)
class StepFlops:
    """Forward + backward FLOPs of one step of `batch` x `seq` tokens, per place it runs."""

    batch: int
    seq: int
    client: int   # SplitLoRA client: embeddings + first blocks, forward and backward
    server: int   # SplitLoRA server: the other blocks + head + loss, forward and backward
    full: int     # CenLoRA / FedLoRA: the whole model, forward and backward

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def probe(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    """A full (unpadded) batch of random tokens."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids, "position_ids": (mask.cumsum(-1) - 1)}


def step_flops(client: SplitPart, server: SplitPart, full: PeftModel, batch: int, seq: int) -> StepFlops:
    """Count the three kinds of step on one probe batch."""
    b = probe(batch, seq, server.vocab_size)
    mask, pos = b["attention_mask"], b["position_ids"]

    def client_step() -> None:
        hidden = client(b["input_ids"], mask, pos)
        hidden.backward(torch.ones_like(hidden))

    def server_step() -> None:
        hidden = torch.randn(batch, seq, server.hidden_size, requires_grad=True)
        causal_lm_loss(server(hidden, mask, pos), b["labels"])[0].backward()

    def full_step() -> None:
        logits = full(input_ids=b["input_ids"], attention_mask=mask, position_ids=pos).logits
        causal_lm_loss(logits, b["labels"])[0].backward()

    counts = [_count(fn) for fn in (client_step, server_step, full_step)]
    for module in (client, server, full):
        module.zero_grad(set_to_none=True)
    return StepFlops(batch, seq, *counts)
