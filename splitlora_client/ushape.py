"""The client's top part in u-shape mode: blocks [L-J, L), the final norm and the head, where the loss is computed
on the client's own labels. Labels, logits and the loss never leave this module; what goes back to the server is
the gradient at the top cut."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from common.defenses import ActivationDefense
from common.loss import causal_lm_loss
from common.split.parts import SplitPart
from splitlora_client.prefetch import Prepared, StepPreparer
from splitlora_client.session import SplitSession, StepResult


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

    def step(self, top_hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> TopResult:
        """Loss of the batch's labels from `top_hidden`, and its gradients (not accumulated into `.grad`, so an
        exchange that fails afterwards leaves no trace)."""
        top = top_hidden.detach().to(self.part.base_dtype).requires_grad_(True)
        logits = self.part(top, batch["attention_mask"], batch["position_ids"])
        loss, tokens = causal_lm_loss(logits, batch["labels"], self.label_smoothing)
        grads = torch.autograd.grad(loss, [top, *self.params], allow_unused=True)
        param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads[1:])]
        return TopResult(float(loss.detach()), int(tokens), grads[0].detach().float(), param_grads)

    def apply(self, result: TopResult) -> None:
        """Put the step's gradients on the top part's parameters (before the optimizer step)."""
        for param, grad in zip(self.params, result.param_grads):
            param.grad = grad if param.grad is None else param.grad + grad


def u_step(session: SplitSession, prep: StepPreparer, prepared: Prepared, rnd: int, top: TopHead,
           defense: ActivationDefense, while_waiting: Callable[[], None] | None = None) -> StepResult:
    """A u-shape step, sent whole: h_K (defended) out, h_{L-J} back; the loss here; the top-cut gradient out, the
    bottom-cut gradient back, backpropagated into the bottom part. The top part's gradients are applied only once
    both exchanges succeeded (the caller takes the optimizer step)."""
    step, batch = prepared.step, prepared.batch
    hidden = defense.apply(prep.forward(prepared), batch["attention_mask"])  # before anything is sent
    sent = session.send(step, rnd, hidden.detach(), batch["attention_mask"], None, batch["position_ids"])
    if while_waiting is not None:
        while_waiting()
    top_hidden, received = session.receive_top(step)
    result = top.step(top_hidden, batch)
    sent += session.send_top_grad(step, result.top_grad)
    answer = session.receive(step, sent)
    defense.backward(prep.part, batch, hidden, answer.grad)  # with NoPeek's term, when on
    top.apply(result)
    return StepResult(answer.grad, result.loss, result.tokens, sent, received + answer.bytes_received)
