"""A short pretraining of the generated base model, so that LoRA fine-tunes a model that already knows the
language, as the paper's pretrained GPT-2 does (there is no model hub here to fetch GPT-2's weights).

Every parameter trains, with the plain next-token loss over whole E2E lines (context and text), on lines of
the evaluation file whose context is none of the held-out examples' contexts: the base never sees the training
file (that is what the methods fine-tune on) nor the meaning representations the validation loss is taken on."""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from common.data import BatchStream, Encoded, Example, encode
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step

log = logging.getLogger(__name__)


def pretraining_corpus(tokenizer: Any, pool: Sequence[Example], held_out: Sequence[Example],
                       max_len: int) -> list[Encoded]:
    """Whole lines of `pool` (every token a target) whose context is not among `held_out`'s."""
    excluded = {ex.context for ex in held_out}
    lines = [Example(None, f"{ex.context} {ex.completion}" if ex.context else ex.completion)
             for ex in pool if ex.context not in excluded]
    if not lines:
        raise ValueError("no pretraining lines left once the held-out contexts are excluded")
    return [encode(tokenizer, line, max_len) for line in lines]


def pretrain(model: torch.nn.Module, corpus: list[Encoded], pad_id: int, steps: int, batch: int,
             learning_rate: float, seed: int) -> list[float]:
    """`steps` AdamW steps on every parameter (warm-up, then linear decay); returns the training losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimSettings(learning_rate, 0.01, max(1, steps // 10), steps)
    opt, sched = build_optimizer(params, optim)
    stream = BatchStream(corpus, batch, pad_id, seed=seed)
    model.train()
    losses = []
    for step in range(steps):
        b = stream.next_batch()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
        loss, _ = causal_lm_loss(logits, b["labels"])
        loss.backward()
        optimizer_step(params, opt, sched, optim.max_grad_norm)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            recent = losses[-50:]
            log.info("pretraining the base model: step %d/%d, loss %.3f (ppl %.1f)", step + 1, steps,
                     sum(recent) / len(recent), math.exp(min(sum(recent) / len(recent), 50.0)))
    model.eval()
    return losses
