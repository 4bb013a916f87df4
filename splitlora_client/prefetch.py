"""A step's inputs, prepared ahead so the client works while it waits for the server's gradient.

Only what does not depend on the current step's update may be prepared early: the next batch (collation) and,
when the embeddings are frozen (unless LoRA targets them), its embedding. The next step's blocks must run on the
weights after this step's optimizer update, so they never overlap. Random draws (dropout) stay exactly those of a
run without overlap: the step's generator is seeded before its batch is prepared, and its state is restored
before its blocks run, so overlap on or off trains the same adapters bit for bit. (torch's generator is per
process: a server in the client's own process, as in some tests, draws from it too, so exact reproducibility with
dropout needs the roles in their own processes, as deployed.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.data import BatchStream
from common.seeding import seed_step
from common.split.parts import SplitPart


@dataclass
class Prepared:
    """One step's batch, maybe its embedding, and the random state its forward continues from."""

    step: int
    batch: dict[str, torch.Tensor]
    embedded: torch.Tensor | None
    rng_state: torch.Tensor


def embeddings_frozen(part: SplitPart) -> bool:
    """Whether no trainable parameter sits in the client part's embedding modules."""
    return not any(p.requires_grad for path in part.family.embedding_modules
                   for p in part.base.get_submodule(path).parameters())


class StepPreparer:
    """Prepares steps in order (`prepare`) and runs their forward to the cut (`forward`)."""

    def __init__(self, part: SplitPart, batches: BatchStream, seed: int, client_id: str) -> None:
        if part.device.type != "cpu":
            raise ValueError("the client part runs on the CPU")  # only the CPU generator state is carried over
        self.part, self.batches, self.seed, self.client_id = part, batches, seed, client_id
        self.embed_early = embeddings_frozen(part)

    def prepare(self, step: int) -> Prepared:
        """Seed the step's randomness, collate its batch and, with frozen embeddings, embed it."""
        seed_step(self.seed, "client", self.client_id, step)
        batch = self.batches.next_batch()
        embedded = None
        if self.embed_early:
            embedded = self.part.family.embed(self.part.base, batch["input_ids"], batch["position_ids"])
        return Prepared(step, batch, embedded, torch.get_rng_state())

    def forward(self, prepared: Prepared) -> torch.Tensor:
        """The cut activations of a prepared step, on the current weights."""
        torch.set_rng_state(prepared.rng_state)
        batch = prepared.batch
        if prepared.embedded is None:
            return self.part(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        return self.part.run_blocks(prepared.embedded, batch["attention_mask"], batch["position_ids"])
