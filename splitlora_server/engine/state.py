"""The split server's round checkpoints: every server adapter with its optimizer and schedule, and the roster.

Written when a round closes, by the engine thread, before any client can see the round's result: a restarted
server (same --output) resumes from the newest complete one, and every client redoes the open round from its own
checkpoint of the same boundary. Layout: `<output>/checkpoints/round-NNNN/` (see common.state.snapshots).
RNG state needs no saving: every step's randomness is derived from (seed, role, client, step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel

from common.atomic import Tensors
from common.lora import adapter_state, load_adapter_state
from common.state import CheckpointFormatError
from common.state.optimizer import load_optimizer_state, load_scheduler_state, optimizer_state, scheduler_state
from common.state.snapshots import CheckpointDir, check_same_run

ROLE = "server"


@dataclass
class SlotState:
    """A copy of one server adapter's trainable state: adapter tensors, optimizer tensors, JSON metadata."""

    name: str  # the peft adapter name
    adapter: Tensors
    optim: Tensors
    meta: dict


def capture_slot(peft: PeftModel, name: str, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler) -> SlotState:
    """Copy the adapter `name` and its optimizer and scheduler state."""
    optim_tensors, optim_meta = optimizer_state(opt, "optim")
    return SlotState(name, adapter_state(peft, name), optim_tensors,
                     {"optim": optim_meta, "sched": scheduler_state(sched)})


def restore_slot(peft: PeftModel, state: SlotState, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Put a captured state back (in place: optimizer parameter references stay valid)."""
    load_adapter_state(peft, state.adapter, state.name)
    load_optimizer_state(opt, state.optim, state.meta["optim"], "optim")
    load_scheduler_state(sched, state.meta["sched"])


@dataclass
class ServerState:
    """What a server checkpoint holds: the round it starts, the slots by key, the roster and the run's identity."""

    round: int
    slots: dict[str, SlotState]  # slot key (a client id, or the shared adapter's name) -> state
    clients: list[str]           # enrolled client ids, in enrolment order
    steps: int                   # server steps computed so far (statistics only)
    strategy_state: dict[str, torch.Tensor] = field(default_factory=dict)  # beyond the adapter (fedex: residuals)
    split_layers: dict[str, int] = field(default_factory=dict)  # each client's split layer (per-client split points)


class ServerCheckpoints:
    """Round checkpoints of the split server under `<output>/checkpoints`."""

    def __init__(self, output: Path, run: dict, keep: int = 2) -> None:
        self.dir = CheckpointDir(Path(output) / "checkpoints", ROLE, keep)
        self.run = run  # settings a resume must share (schedule, seed, mode, model)

    def save(self, state: ServerState, fault: Callable[[], None] | None = None) -> Path:
        """Write the checkpoint from which round `state.round` starts."""
        tensors: Tensors = {}
        slots = []
        for i, (key, slot) in enumerate(sorted(state.slots.items())):
            tensors.update({f"slot{i}.adapter.{k}": v for k, v in slot.adapter.items()})
            tensors.update({f"slot{i}.{k}": v for k, v in slot.optim.items()})
            slots.append({"key": key, "name": slot.name, "adapter_keys": sorted(slot.adapter), "meta": slot.meta})
        tensors.update({f"strategy.{k}": v for k, v in state.strategy_state.items()})
        meta = {"run": self.run, "slots": slots, "clients": state.clients, "steps": state.steps,
                "strategy_keys": sorted(state.strategy_state), "split_layers": state.split_layers}
        return self.dir.save(state.round, tensors, meta, fault)

    def latest(self) -> ServerState | None:
        """The newest complete checkpoint of this run, or None; refuses one written with other settings."""
        ckpt = self.dir.latest()
        if ckpt is None:
            return None
        check_same_run(ckpt.meta["run"], self.run, ckpt.path)
        if "clients" in self.run and len(ckpt.meta["clients"]) > int(self.run["clients"]):
            raise CheckpointFormatError(f"checkpoint {ckpt.path} enrols {len(ckpt.meta['clients'])} clients, more "
                                        f"than --clients {self.run['clients']}; refusing to resume from it")
        slots = {}
        for i, slot in enumerate(ckpt.meta["slots"]):
            adapter = {k: ckpt.tensors[f"slot{i}.adapter.{k}"] for k in slot["adapter_keys"]}
            optim = {k[len(f"slot{i}."):]: v for k, v in ckpt.tensors.items() if k.startswith(f"slot{i}.optim.")}
            slots[slot["key"]] = SlotState(slot["name"], adapter, optim, slot["meta"])
        strategy = {k: ckpt.tensors[f"strategy.{k}"] for k in ckpt.meta.get("strategy_keys", [])}
        split_layers = {str(c): int(k) for c, k in ckpt.meta.get("split_layers", {}).items()}
        return ServerState(ckpt.round, slots, list(ckpt.meta["clients"]), int(ckpt.meta["steps"]), strategy,
                           split_layers)


def run_identity(cfg, fingerprint) -> dict:
    """The settings a resumed run must share with the checkpoint (anything else would silently diverge)."""
    names = ("clients", "rounds", "local_steps", "batch_size", "learning_rate", "weight_decay", "warmup_steps",
             "max_grad_norm", "label_smoothing", "seed", "server_adapter_mode", "split_layer", "split_range",
             "aggregation")
    return {**{name: getattr(cfg, name) for name in names}, "model_config": fingerprint.config_sha256,
            "model_index": fingerprint.index_sha256, "lora": fingerprint.lora_sha256}
