"""Pipelined steps on the client (GPipe semantics): a step's batch cut into micro-batches of rows.

The client runs micro-batch i+1's forward while the server works on micro-batch i: every forward frame is
queued on the stream as soon as it is computed (gRPC sends it from its own thread). Then each micro-batch's
gradient is received and backpropagated in turn, so the client's backward of micro-batch i overlaps the server's
work on micro-batch i+1. The server divides each micro-batch's summed loss by the target tokens of the whole
step (`step_tokens`), so the micro-batches' gradients add up to the whole step's; both sides accumulate them and
take one optimizer step per batch. The result equals the unpipelined step up to float summation order; with
dropout on, the micro-batches draw their masks one after another (different draws, same distribution).

A mixture-of-experts model trained with the router's auxiliary loss sends each step whole, with its router
statistics: that loss is not a sum over rows, so it cannot be split into micro-batches.

U-shape mode (`top`, the client's top part) runs the same path with a second exchange per micro-batch between the
forwards and the backwards (`ushape.top_exchanges`): the frames carry no labels and no `step_tokens`; the client
divides each micro-batch's loss by the whole step's target tokens itself. The client still computes micro-batch
i+1's forward while the server probes micro-batch i, and its top part of i+1 while the server backpropagates i;
but the server answers every top-cut activation before the first bottom-cut gradient (it reads the forwards
first), so the client's bottom backwards overlap only the server's work on the micro-batches still in flight.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from common.defenses import ActivationDefense
from common.loss import target_tokens
from common.split.router import RouterRecorder, RouterStats, backward_through_cut, router_aux
from splitlora_client.prefetch import Prepared, StepPreparer
from splitlora_client.session import SplitSession, StepResult
from splitlora_client.ushape import TopHead, top_exchanges


def micro_rows(rows: int, count: int) -> list[slice]:
    """`count` contiguous row ranges of a batch, as equal as possible (fewer when it has fewer rows)."""
    count = max(1, min(count, rows))
    bounds = [rows * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class Laps:
    """Seconds of a step's phases: each call adds the time since the previous one to `phase`."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.phases = dict.fromkeys(names, 0.0)
        self._clock = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] += now - self._clock
        self._clock = now


def pipelined_step(session: SplitSession, prep: StepPreparer, prepared: Prepared, rnd: int, count: int,
                   while_waiting: Callable[[], None] | None = None, part: Any = None,
                   defense: ActivationDefense | None = None, top: TopHead | None = None) -> StepResult:
    """Run a prepared step through the server as `count` micro-batches and backpropagate every gradient into the
    client part (the caller takes the optimizer step); return the step's loss, tokens and bytes. `part`: the
    client part, whose router statistics travel with the step when its model has a router auxiliary loss.
    `defense`: the activation defenses applied to each micro-batch before it is sent (docs/privacy.md). `top`:
    u-shape mode, the client's top part (its gradients applied once every exchange of the step succeeded)."""
    defense = defense or ActivationDefense()
    step, batch = prepared.step, prepared.batch
    with_router = top is None and part is not None and router_aux(part.family, part.config) is not None
    if with_router and defense.settings.nopeek:
        raise ValueError("--defense-nopeek is not supported with a mixture-of-experts router auxiliary loss")
    slices = micro_rows(int(batch["input_ids"].shape[0]), 1 if with_router else count)
    step_tokens = target_tokens(batch["labels"]) if len(slices) > 1 else 0
    lap = Laps(("forward", "send", "prepare", "wait", "decode", "backward", *(("top",) if top else ())))
    phases = lap.phases
    noise = prep.noise_generator(step) if defense.settings.noise else None
    cuts: list[torch.Tensor | None] = []
    routers: list[RouterStats | None] = []
    sent = 0
    for i, rows in enumerate(slices):
        if with_router:
            with RouterRecorder(part, batch["attention_mask"][rows]) as recorder:
                hidden = prep.forward(prepared, rows)
            routers.append(recorder.stats())
        else:
            hidden = prep.forward(prepared, rows)
            routers.append(None)
        hidden = defense.apply(hidden, batch["attention_mask"][rows], noise)  # before anything is sent
        lap("forward")
        sent += session.send(step, rnd, hidden.detach(), batch["attention_mask"][rows],
                             None if top else batch["labels"][rows], batch["position_ids"][rows], routers[i],
                             micro=i, micro_count=len(slices), step_tokens=0 if top else step_tokens)
        lap("send")  # encoding and serializing (gRPC writes from its own thread)
        cuts.append(hidden)
    if while_waiting is not None:
        while_waiting()
        lap("prepare")  # the next batch (--overlap), while the server works
    tops, top_sent, received = top_exchanges(session, top, step, batch, slices, step_tokens, lap) if top else ([], 0, 0)
    sent, loss, tokens = sent + top_sent, 0.0, 0
    for i, hidden in enumerate(cuts):
        result = session.receive(step, micro=i)
        lap("wait")  # the wire and the server's work, as far as not overlapped; then decoding the answer:
        decoding = result.phases.get("decode", 0.0)
        phases["wait"] -= decoding
        phases["decode"] += decoding
        if defense.settings.nopeek:  # with NoPeek's loss term on this micro-batch's rows
            defense.backward(part or prep.part, {k: v[slices[i]] for k, v in batch.items()}, hidden, result.grad)
        else:
            backward_through_cut(hidden, result.grad, routers[i], result.router_grad)
        lap("backward")
        cuts[i] = routers[i] = None  # its graph is freed
        scored = tops[i] if top else result  # u-shape: the loss is the client's own
        loss, tokens, received = loss + scored.loss, tokens + scored.tokens, received + result.bytes_received
    for scored in tops:
        top.apply(scored)
    return StepResult(torch.empty(0), loss, tokens, sent, received, phases=phases)
