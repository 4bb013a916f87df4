"""A step's inputs, prepared ahead so the client works while it waits for the server's gradient.

Only what does not depend on the current step's update may be prepared early: the next batch (collation) and
the random state its forward will start from. The next step's forward, embedding included, runs after this
step's optimizer update. Preparing touches no global state: the step's random state comes from a private
generator seeded exactly as `seed_torch` seeds the global one and is installed right before the forward, so
overlap on or off trains the same adapters bit for bit, even with a server in the same process (which seeds
torch's per-process generator for its own steps while the client prepares).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.data import BatchStream
from common.seeding import derive_seed
from common.split.parts import SplitPart


@dataclass
class Prepared:
    """One step's collated batch and the random state its forward starts from."""

    step: int
    batch: dict[str, torch.Tensor]
    rng_state: torch.Tensor


class StepPreparer:
    """Prepares steps in order (`prepare`) and runs their forward to the cut (`forward`)."""

    def __init__(self, part: SplitPart, batches: BatchStream, seed: int, client_id: str) -> None:
        if part.device.type != "cpu":
            raise ValueError("the client part runs on the CPU")  # only the CPU generator state is installed
        self.part, self.batches, self.seed, self.client_id = part, batches, seed, client_id

    def prepare(self, step: int) -> Prepared:
        """Collate the step's batch and derive its random state; no global state is touched."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "client", self.client_id, step))
        return Prepared(step, self.batches.next_batch(), generator.get_state())

    def noise_generator(self, step: int) -> torch.Generator:
        """The generator the activation defense draws step `step`'s noise from (all its micro-batches in order)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, "client-defense", self.client_id, step))

    def forward(self, prepared: Prepared, rows: slice = slice(None)) -> torch.Tensor:
        """The cut activations of a prepared step (of its `rows`, a micro-batch), on the current weights, with the
        step's random draws: its first rows start from the step's random state, later micro-batches go on from
        where the previous one left it."""
        if not rows.start:
            torch.set_rng_state(prepared.rng_state)
        batch = prepared.batch
        return self.part(batch["input_ids"][rows], batch["attention_mask"][rows], batch["position_ids"][rows])
