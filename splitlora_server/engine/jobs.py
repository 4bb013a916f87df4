"""What the engine works on: the one step type (from the decoded frame to the compute path) and the jobs of its
queue. A training step is a `Forward` job whose backward and update follow at once (`Backward`, `Update`);
generation would be forward jobs with a KV cache, and a U-shaped step a forward and, one exchange later, a
backward sent by the client (see docs/architecture.md)."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from common.split.router import RouterStats


@dataclass
class Step:
    """One client step as it arrives at the server (validated by `splitlora_server.frames`), or several
    clients' steps stacked into one batch (`compute.stack`)."""

    client_id: str
    step: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    router: RouterStats | None = None  # the client layers' router statistics (mixture of experts, aux loss on)
    micro: int = 0        # pipelined steps: this micro-batch's index, of micro_count, whose loss is divided by
    micro_count: int = 1  # step_tokens (the target tokens of the whole step); see engine.micro
    step_tokens: int = 0
    start: int | None = None  # the client's split layer: the first server block its step runs (None: the part's)

    @property
    def pipelined(self) -> bool:
        """Whether this is one micro-batch of a step sent in several."""
        return self.micro_count > 1

    @property
    def rows(self) -> int:
        """Sequences in the batch (the samples a step trains on)."""
        return int(self.hidden.shape[0])


@dataclass
class StepOutcome:
    """The server's answer to one step."""

    grad: torch.Tensor
    loss: float
    tokens: int
    router_grad: torch.Tensor | None = None  # d loss / d the client's routing probabilities (when it sent them)
    aux_loss: float = 0.0                    # the router's auxiliary loss term (included in loss)


@dataclass
class Forward:
    """Run the blocks and head of a step (batching may stack it with other clients' forward jobs); `alone`: never
    stack it (a retry after its batch failed)."""

    step: Step
    future: Future = field(default_factory=Future)
    alone: bool = False


@dataclass
class Backward:
    """Backpropagate a group's losses to the cut (follows its Forward at once)."""

    group: list[Forward]
    pending: Any  # compute.Pending


@dataclass
class Update:
    """Step the group's server adapter with the gradient its Backward left, and answer its steps."""

    group: list[Forward]
    pending: Any  # compute.Pending


@dataclass
class Call:
    """Run a function on the engine thread, in queue order."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


Job = Forward | Backward | Update | Call | None  # None stops the worker
