"""The client's top part in u-shape mode: blocks [L-J, L), the final norm and the head, where the loss is computed
on the client's own labels. Labels, logits and the loss never leave this module; what goes back to the server is
the gradient at the top cut. A u-shape step runs through `pipeline.pipelined_step` like a standard one (whole, or
in micro-batches), with the top exchanges of `top_exchanges` between its forwards and its backwards."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from common.loss import causal_lm_loss
from common.split.parts import SplitPart
from splitlora_client.session import SplitSession


@dataclass
class TopResult:
    """One step's loss on the client and the gradients it produced (applied once the server answered)."""

    loss: float
    tokens: int
    top_grad: torch.Tensor          # dLoss/dHidden at the top cut: the only thing sent back
    param_grads: list[torch.Tensor]  # of `TopHead.params`, in order


class TopHead:
    """Runs the top part on the server's top-cut activations and differentiates the client's loss."""

    def __init__(self, part: SplitPart, label_smoothing: float) -> None:
        if not part.segment.head:
            raise ValueError("the u-shape top part must hold the head")
        self.part, self.label_smoothing = part, label_smoothing
        self.params = [p for p in part.parameters() if p.requires_grad]

    def step(self, top_hidden: torch.Tensor, batch: dict[str, torch.Tensor],
             normalizer: int | None = None) -> TopResult:
        """Loss of the batch's labels from `top_hidden`, and its gradients (not accumulated into `.grad`, so an
        exchange that fails afterwards leaves no trace). `normalizer`: a micro-batch's summed loss is divided by
        the target tokens of its whole step (`common.loss.causal_lm_loss`), so the micro-batches' gradients add up
        to the whole step's."""
        top = top_hidden.detach().to(self.part.base_dtype).requires_grad_(True)
        logits = self.part(top, batch["attention_mask"], batch["position_ids"])
        loss, tokens = causal_lm_loss(logits, batch["labels"], self.label_smoothing, normalizer)
        grads = torch.autograd.grad(loss, [top, *self.params], allow_unused=True)
        param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads[1:])]
        return TopResult(float(loss.detach()), int(tokens), grads[0].detach().float(), param_grads)

    def apply(self, result: TopResult) -> None:
        """Put the step's gradients on the top part's parameters (before the optimizer step)."""
        for param, grad in zip(self.params, result.param_grads):
            param.grad = grad if param.grad is None else param.grad + grad


def top_exchanges(session: SplitSession, top: TopHead, step: int, batch: dict[str, torch.Tensor],
                  slices: list[slice], step_tokens: int, lap: Callable[[str], None]) -> tuple[list[TopResult], int, int]:
    """Each micro-batch's second exchange, in order: its top-cut activations in, its loss here (its share of the
    step's, over `step_tokens` target tokens when there are several), its top-cut gradient out; the server
    backpropagates micro-batch i while this runs the top part of i+1. Returns the results (their parameter
    gradients not yet applied) and the bytes sent and received."""
    results, sent, received = [], 0, 0
    for i, rows in enumerate(slices):
        top_hidden, got = session.receive_top(step, micro=i)
        lap("wait")
        results.append(top.step(top_hidden, {k: v[rows] for k, v in batch.items()}, step_tokens or None))
        lap("top")
        sent += session.send_top_grad(step, results[-1].top_grad, micro=i)
        lap("send")
        received += got
    return results, sent, received
