"""The one compute path of the server part: forward, backward and update of a group of steps (one step, or
several clients' steps stacked by the batching policy).

Semantics of a group of several steps (shared server adapter only):

- Every client in a group sees the same server adapter weights. The combined objective is the *sum of the
  per-client mean losses*, so each client's loss and its gradient at the cut are exactly what it would get
  alone with those weights (rows of a transformer batch do not interact; padding is masked and labelled -100).
- The blocks run once over the stacked batch; the head and loss run step by step on the blocks' output, so
  only one step's logits (vocabulary-sized) are alive at a time, and one backward pass goes through the blocks.
- One optimizer step is taken on the combined gradient (clipped as a whole), and the learning-rate schedule
  advances once per client step in the group, so it follows the configured number of client steps.
- Processed one by one, client 2 would instead see the adapter already updated by client 1. That update order
  is the only difference, and it is inherent to batching.
- Dropout masks of a group are drawn for the group as a whole (seeded by its members), so with dropout on, a
  batched run is reproducible only if the same steps meet in the same groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from common.loss import IGNORE_INDEX, causal_lm_loss
from common.optim import optimizer_step
from common.split.parts import SplitPart
from common.split.router import RouterRecorder
from splitlora_server.engine.jobs import Step, StepOutcome

Span = tuple[int, int, int]  # a step's rows in a stack: first row, end row, its own sequence length


def _pad_seq(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = (0, 0, 0, extra) if t.dim() == 3 else (0, extra)
    return F.pad(t, pad, value=value)


def stack(steps: Sequence[Step]) -> tuple[Step, list[Span]]:
    """Right-pad every step to the longest sequence (hidden 0, mask 0, position 0, label -100) and concatenate;
    return the stacked step and each step's span in it. Every step must have the same split layer."""
    if len({s.start for s in steps}) > 1:
        raise ValueError("steps of clients with different split layers cannot be stacked")
    width = max(int(s.hidden.shape[1]) for s in steps)
    spans, row = [], 0
    for s in steps:
        spans.append((row, row + s.rows, int(s.hidden.shape[1])))
        row += s.rows
    stacked = Step("+".join(s.client_id for s in steps), -1,
                   hidden=torch.cat([_pad_seq(s.hidden, width, 0.0) for s in steps]),
                   attention_mask=torch.cat([_pad_seq(s.attention_mask, width, 0) for s in steps]),
                   position_ids=torch.cat([_pad_seq(s.position_ids, width, 0) for s in steps]),
                   labels=torch.cat([_pad_seq(s.labels, width, IGNORE_INDEX) for s in steps]), start=steps[0].start)
    return stacked, spans


def split_rows(stacked: torch.Tensor, spans: Sequence[Span]) -> list[torch.Tensor]:
    """Each step's part of a stacked tensor, without the padding added by `stack`."""
    return [stacked[a:b, :t].contiguous() for a, b, t in spans]


@dataclass
class Pending:
    """A group between its forward and its update: the graph to backpropagate and what each step scored."""

    hidden: torch.Tensor     # the cut activations (leaf, requires grad)
    out: torch.Tensor        # the blocks' output (graph to backpropagate)
    top: torch.Tensor        # the same, detached: the head's input, holding the heads' gradient
    spans: list[Span]
    results: list[tuple[float, int]]  # per step: loss, target tokens
    counted: int             # losses backpropagated through the heads (those with tokens and a finite value)
    router: "RouterTerms | None" = None  # mixture of experts with the auxiliary loss on


@dataclass
class RouterTerms:
    """The router auxiliary loss of a group: per step its value and the client's probabilities (leaves whose
    gradient goes back to the client), and the sum over the counted steps (backpropagated through the blocks)."""

    values: list[float]
    client_probs: list[torch.Tensor]
    counted: torch.Tensor | None = None


def forward(part: SplitPart, steps: Sequence[Step], label_smoothing: float) -> Pending:
    """Blocks over the (stacked) steps, head and loss per step, each counted loss backpropagated to the
    blocks' output (which frees its logits before the next step's are made). With a router auxiliary loss, each
    step's term (over its own tokens and the client's statistics) joins its loss."""
    stacked, spans = stack(steps) if len(steps) > 1 else (steps[0], [(0, steps[0].rows, steps[0].hidden.shape[1])])
    device = part.device
    hidden = stacked.hidden.detach().to(device).requires_grad_(True)
    with RouterRecorder(part, stacked.attention_mask.to(device)) as routers:
        out = part.run_blocks(hidden.to(part.base_dtype), stacked.attention_mask.to(device),
                              stacked.position_ids.to(device), start=steps[0].start)
    top = out.detach().requires_grad_(True)
    labels, results, counted = stacked.labels.to(device), [], 0
    router = RouterTerms([], []) if routers.aux else None
    normalizer = steps[0].step_tokens if len(steps) == 1 and steps[0].pipelined else None  # a micro-batch's share
    for step, (a, b, t) in zip(steps, spans):
        loss, tokens = causal_lm_loss(part.family.head(part.base, top[a:b, :t]), labels[a:b, :t], label_smoothing,
                                      normalizer)
        aux = _router_term(router, routers, step, (a, b, t)) if router else None
        total = loss if aux is None else loss + aux
        if tokens and torch.isfinite(total):
            loss.backward()
            counted += 1
            if aux is not None:
                router.counted = aux if router.counted is None else router.counted + aux
        results.append((float(total.detach()), tokens))
    return Pending(hidden, out, top, spans, results, counted, router)


def _router_term(terms: RouterTerms, routers: RouterRecorder, step: Step, span: Span) -> torch.Tensor:
    aux, probs = routers.aux_term(step.router, span)
    terms.values.append(float(aux.detach()))
    terms.client_probs.append(probs)
    return aux


def backward(pending: Pending) -> None:
    """The counted losses' gradient through the blocks, down to the cut activations (and, with a router
    auxiliary loss, to the client's routing probabilities)."""
    if not pending.counted:
        return
    aux = pending.router.counted if pending.router else None
    if aux is None:
        pending.out.backward(pending.top.grad)
    else:
        torch.autograd.backward([pending.out, aux], [pending.top.grad, torch.ones_like(aux)])


def grads_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every parameter gradient is finite (or absent)."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def update(params: Sequence[torch.Tensor], opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
           pending: Pending, max_grad_norm: float) -> None:
    """One optimizer step on the group's gradient, the schedule advanced once per counted step; nothing (the
    gradient dropped) when no loss counted or a gradient is not finite."""
    if pending.counted and grads_finite(params):
        optimizer_step(params, opt, sched, max_grad_norm)
        for _ in range(pending.counted - 1):  # the schedule counts client steps, as without batching
            sched.step()
    else:
        opt.zero_grad(set_to_none=True)


def outcomes(pending: Pending) -> list[StepOutcome]:
    """Each step's answer: its gradient at the cut (without padding), its loss and its target tokens (and, with
    a router auxiliary loss, the gradient for the client's routing probabilities and the term's value)."""
    grad = pending.hidden.grad if pending.hidden.grad is not None else torch.zeros_like(pending.hidden)
    answers = [StepOutcome(grad=g.detach().float().cpu(), loss=loss, tokens=tokens)
               for g, (loss, tokens) in zip(split_rows(grad, pending.spans), pending.results)]
    if pending.router:
        for answer, probs, value in zip(answers, pending.router.client_probs, pending.router.values):
            answer.router_grad = (probs.grad if probs.grad is not None else torch.zeros_like(probs)).detach().cpu()
            answer.aux_loss = value
    return answers
