"""The client's first contact with the server: fetch the run's plan and take it into the client's options."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from common.lora import from_bytes, load_adapter_state
from common.plan import apply_plan
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.parts import SplitPart
from splitlora_client.options import TrainConfig
from splitlora_client.session import SplitSession
from splitlora_client.split_choice import (AUTO, MemoryEstimate, choose_split_layer, estimate_memory, parse_memory,
                                          parse_split_choice)

log = logging.getLogger("splitlora.client")


@dataclass
class ClientPlan:
    """What the server decided for this run, as this client uses it."""

    message: spb.Plan

    @property
    def schedule(self) -> spb.Schedule:
        return self.message.schedule

    def load_initial_adapter(self, part: SplitPart) -> None:
        """Start from the server's initial client adapter (`serve --init-adapter`), if it has one."""
        if self.message.initial_client_adapter:
            load_adapter_state(part.peft, from_bytes(self.message.initial_client_adapter))
            log.info("client adapter initialized from the server's --init-adapter")


def take_plan(cfg: TrainConfig, session: SplitSession) -> ClientPlan:
    """Ask the server for its plan (ConnectionError naming the likely causes when it cannot be reached) and
    fill this client's unpinned options with it (ConfigError naming a pin that differs); then choose the split
    layer (splitlora_client.split_choice)."""
    plan = session.get_plan(cfg.join_timeout, cfg)
    choice = parse_split_choice(cfg.split_layer)
    ranged = bool(_planned(plan.model_options_json).get("split_range"))
    cfg.split_layer = None if choice == AUTO or ranged else choice  # without a range a pin must equal the plan's
    taken = apply_plan(cfg, plan.model_options_json)
    cfg.split_layer = _choose(cfg, choice, plan.schedule)
    cfg.validate_model()
    log.info("plan of %s: split layer %d, LoRA r=%d alpha=%g targets %s (taken from the server: %s)", cfg.server,
             cfg.split_layer, cfg.lora_r, cfg.lora_alpha, ",".join(cfg.lora_targets) or "(the family's default)",
             ", ".join(taken) or "none, every option pinned")
    return ClientPlan(plan)


def _planned(text: str) -> dict:
    try:
        planned = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}  # apply_plan names the problem
    return planned if isinstance(planned, dict) else {}


def _choose(cfg: TrainConfig, choice: int | str | None, schedule: spb.Schedule) -> int:
    """The split layer within the plan's range: pinned, the plan's, or auto (printed with its estimate)."""
    budget = parse_memory(cfg.max_memory) if cfg.max_memory else None
    model_dir, lora = cfg.model_dir(), cfg.lora_settings()

    def estimate(layer: int) -> MemoryEstimate:
        return estimate_memory(model_dir, layer, lora, cfg.dtype, schedule.batch_size, schedule.max_seq_len)

    k, found = choose_split_layer(choice, int(cfg.split_layer), cfg.split_bounds(), budget, estimate)
    if found is not None:
        message = f"{cfg.client_id}: split layer {k} chosen for --max-memory {cfg.max_memory}: about {found.describe()}"
        log.info(message)
        print(message, flush=True)
    return k
