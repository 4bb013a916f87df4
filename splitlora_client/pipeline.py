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
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from common.loss import target_tokens
from common.split.router import RouterRecorder, RouterStats, backward_through_cut, router_aux
from splitlora_client.prefetch import Prepared, StepPreparer
from splitlora_client.session import SplitSession, StepResult


def micro_rows(rows: int, count: int) -> list[slice]:
    """`count` contiguous row ranges of a batch, as equal as possible (fewer when it has fewer rows)."""
    count = max(1, min(count, rows))
    bounds = [rows * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def pipelined_step(session: SplitSession, prep: StepPreparer, prepared: Prepared, rnd: int, count: int,
                   while_waiting: Callable[[], None] | None = None, part: Any = None) -> StepResult:
    """Run a prepared step through the server as `count` micro-batches and backpropagate every gradient into the
    client part (the caller takes the optimizer step); return the step's loss, tokens and bytes. `part`: the
    client part, whose router statistics travel with the step when its model has a router auxiliary loss."""
    step, batch = prepared.step, prepared.batch
    with_router = part is not None and router_aux(part.family, part.config) is not None
    slices = micro_rows(int(batch["input_ids"].shape[0]), 1 if with_router else count)
    step_tokens = target_tokens(batch["labels"]) if len(slices) > 1 else 0
    phases = dict.fromkeys(("forward", "send", "prepare", "wait", "decode", "backward"), 0.0)
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[phase] += now - clock
        clock = now

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
        lap("forward")
        sent += session.send(step, rnd, hidden.detach(), batch["attention_mask"][rows], batch["labels"][rows],
                             batch["position_ids"][rows], routers[i], micro=i, micro_count=len(slices),
                             step_tokens=step_tokens)
        lap("send")  # encoding and serializing (gRPC writes from its own thread)
        cuts.append(hidden)
    if while_waiting is not None:
        while_waiting()
        lap("prepare")  # the next batch (--overlap), while the server works
    loss, tokens, received = 0.0, 0, 0
    for i, hidden in enumerate(cuts):
        result = session.receive(step, micro=i)
        lap("wait")  # the wire and the server's work, as far as not overlapped; then decoding the answer:
        decoding = result.phases.get("decode", 0.0)
        phases["wait"] -= decoding
        phases["decode"] += decoding
        backward_through_cut(hidden, result.grad, routers[i], result.router_grad)
        lap("backward")
        cuts[i] = routers[i] = None  # its graph is freed
        loss, tokens, received = loss + result.loss, tokens + result.tokens, received + result.bytes_received
    return StepResult(torch.empty(0), loss, tokens, sent, received, phases=phases)
