"""Where a client is within a pipelined step: which micro-batch comes next and what the step's answered
micro-batches add up to (loss, target tokens, rows). A step sent whole is a step of one micro-batch."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.loss import target_tokens
from splitlora_server.engine.jobs import Step
from splitlora_server.errors import Refused


@dataclass
class MicroProgress:
    """One client's step in progress; reset when the client (re)joins."""

    next: int = 0         # the micro-batch expected next
    count: int = 1        # micro-batches of the step in progress
    step_tokens: int = 0  # target tokens of the whole step, as micro-batch 0 said
    loss: float = 0.0     # sums over the answered micro-batches of the step
    tokens: int = 0
    rows: int = 0

    def check(self, step: Step, negotiated: int) -> None:
        """Refuse a micro-batch that does not follow the previous one, or whose counts do not add up."""
        if step.micro != self.next:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"micro-batch {step.micro} of step {step.step} is out of order: the server expects "
                          f"micro-batch {self.next}")
        if step.micro_count > negotiated:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"step {step.step} is sent as {step.micro_count} micro-batches; at most {negotiated} "
                          "were negotiated at Join")
        if step.micro and (step.micro_count, step.step_tokens) != (self.count, self.step_tokens):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"micro-batch {step.micro} of step {step.step} says {step.micro_count} micro-batches and "
                          f"{step.step_tokens} step tokens; micro-batch 0 said {self.count} and {self.step_tokens}")
        if not step.pipelined or step.labels is None:  # u-shape: the target tokens are counted on the client
            return
        so_far = (self.tokens if step.micro else 0) + target_tokens(step.labels)
        last = step.micro + 1 == step.micro_count
        if so_far > step.step_tokens or (last and so_far != step.step_tokens):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the micro-batches of step {step.step} hold {so_far} target tokens "
                          f"{'so far' if not last else 'in all'}, but step_tokens says {step.step_tokens}")

    def add(self, step: Step, loss: float, tokens: int) -> bool:
        """Account an answered micro-batch; True when it was its step's last (the sums then hold the step)."""
        if step.micro == 0:
            self.count, self.step_tokens, self.loss, self.tokens, self.rows = \
                step.micro_count, step.step_tokens, 0.0, 0, 0
        self.loss, self.tokens, self.rows = self.loss + loss, self.tokens + tokens, self.rows + step.rows
        last = step.micro + 1 >= step.micro_count
        self.next = 0 if last else step.micro + 1
        return last
