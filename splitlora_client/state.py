"""The client's round checkpoints: its adapter, optimizer and schedule, and its position in its data.

Checkpoint k (`<output>/checkpoints/round-000k/`) is the state from which round k starts, written as soon as the
local steps of round k-1 are done, before the adapter is submitted: it holds the local adapter (resubmitted if
the aggregator never got it), and the global adapter of round k-1 is fetched again on resume. Checkpoint 0 is
the initial state and stays in memory. The newest two are kept: a server that restarts from its own last
checkpoint may be one round behind. RNG state needs no saving: the data order is derived from (seed, epoch)
and every step's dropout from (seed, role, client, step).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from common.atomic import Tensors
from common.data import BatchStream
from common.lora import AdapterError, adapter_state
from common.split.ushape import load_client_adapter
from common.residuals import ResidualFolder, split_residuals
from common.state.optimizer import load_optimizer_state, load_scheduler_state, optimizer_state, scheduler_state
from common.state.snapshots import CheckpointDir, check_same_run

ROLE = "client"


@dataclass
class Snapshot:
    """A copy of the client's training state (what a checkpoint holds)."""

    tensors: Tensors
    meta: dict


@dataclass
class ClientState:
    """The client's trainable state: its adapter, the optimizer and schedule over it, and its data stream (the
    base weights change only by folding a global adapter's residuals, which every round start reloads)."""

    peft: PeftModel
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    batches: BatchStream
    folder: ResidualFolder  # fedex: the global residuals folded into the frozen base weights
    top: PeftModel | None = None  # u-shape mode: the top part (blocks [L-J, L) and the head); one adapter with it

    def capture(self, samples: int = 0) -> Snapshot:
        """Copy the state; `samples`: examples trained on in the round just done (the submission's weight)."""
        adapter = self.local_adapter()
        optim_tensors, optim_meta = optimizer_state(self.opt, "optim")
        return Snapshot({**{f"adapter.{k}": v for k, v in adapter.items()}, **optim_tensors},
                        {"adapter_keys": sorted(adapter), "optim": optim_meta, "sched": scheduler_state(self.sched),
                         "data": self.batches.state_dict(), "samples": samples})

    def restore(self, snap: Snapshot) -> None:
        """Put a captured state back, exactly."""
        self.load_adapter({k: snap.tensors[f"adapter.{k}"] for k in snap.meta["adapter_keys"]})
        load_optimizer_state(self.opt, snap.tensors, snap.meta["optim"], "optim")
        load_scheduler_state(self.sched, snap.meta["sched"])
        self.batches.load_state_dict(snap.meta["data"])

    def local_adapter(self) -> dict[str, torch.Tensor]:
        """The client's adapter: its bottom part's, and in u-shape mode its top part's too (disjoint keys)."""
        return {**adapter_state(self.peft), **(adapter_state(self.top) if self.top is not None else {})}

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        """Load a whole client adapter (as `local_adapter` returns it) into the part(s), checked per part."""
        load_client_adapter(self.peft, self.top, state)

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        """Load a round's global adapter, folding its residuals (fedex) into the base weights; other tensors a
        strategy keeps in the global state are the aggregator's business."""
        layout = self.local_adapter()
        missing = sorted(set(layout) - set(state))
        if missing:
            raise AdapterError(f"the global adapter lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self.load_adapter({k: state[k] for k in layout})
        self.folder.fold(split_residuals(state)[1])


class ClientCheckpoints:
    """Round checkpoints on disk plus the initial state in memory."""

    def __init__(self, root: Path, run: dict, initial: Snapshot, keep: int = 2) -> None:
        self.dir = CheckpointDir(root, ROLE, keep)
        self.run, self.initial = run, initial

    def save(self, round: int, snap: Snapshot) -> None:
        """Write checkpoint `round` (the state from which that round starts)."""
        self.dir.save(round, snap.tensors, {**snap.meta, "run": self.run})

    def best(self, round: int) -> int:
        """The newest checkpoint from which `round` can start: `round` itself, or an older one (the client then
        missed rounds and continues from the global adapter)."""
        return max([0, *(r for r in self.dir.rounds() if r <= round)])

    def load(self, round: int) -> Snapshot:
        """Read checkpoint `round` (0: the initial state); refuses one of another run."""
        if round == 0:
            return self.initial
        ckpt = self.dir.load(round)
        check_same_run(ckpt.meta.get("run", {}), self.run, ckpt.path)
        return Snapshot(ckpt.tensors, ckpt.meta)

    def drop_after(self, round: int) -> None:
        """Forget checkpoints of rounds after `round`: the server rolled back to it, they are of another past."""
        self.dir.prune(after=round)
