"""The client's first contact with the server: fetch the run's plan and take it into the client's options."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from common.lora import from_bytes, load_adapter_state
from common.plan import apply_plan
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.parts import SplitPart
from splitlora_client.options import TrainConfig
from splitlora_client.session import SplitSession

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
    fill this client's unpinned options with it (ConfigError naming a pin that differs)."""
    plan = session.get_plan(cfg.join_timeout, cfg)
    taken = apply_plan(cfg, plan.model_options_json)
    cfg.validate_model()
    log.info("plan of %s: split layer %d (%s%s), LoRA r=%d alpha=%g targets %s (taken from the server: %s)",
             cfg.server, cfg.split_layer, cfg.split_mode, f", J={cfg.top_blocks}" if cfg.u_shape else "", cfg.lora_r,
             cfg.lora_alpha, ",".join(cfg.lora_targets) or "(the family's default)",
             ", ".join(taken) or "none, every option pinned")
    return ClientPlan(plan)
