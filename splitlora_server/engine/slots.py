"""The server adapters the engine trains ("slots"): one shared, or one per client; their optimizers, the
snapshots of the last round boundary, rollback of a client's partial round, and the round-end average.
Engine thread only."""
from __future__ import annotations

import logging
from typing import Literal

from common.aggregation import ClientUpdate, Strategy
from common.aggregation.guard import guarded_aggregate
from common.lora import AdapterState, adapter_state, load_adapter_state
from common.optim import OptimSettings, build_optimizer
from common.residuals import ResidualFolder, split_residuals
from common.split.parts import SplitPart
from splitlora_server.engine.split_points import SplitPoints, per_client_updates, shared_updates
from splitlora_server.engine.state import ServerState, SlotState, capture_slot, restore_slot

log = logging.getLogger(__name__)
AdapterMode = Literal["shared", "per-client"]
SHARED = "default"


class Slot:
    """The trainable state of one server adapter: its parameters, optimizer and schedule."""

    def __init__(self, part: SplitPart, name: str, settings: OptimSettings, freeze_a: bool = False) -> None:
        self.name = name
        self.params = [p for n, p in part.peft.named_parameters() if f".{name}." in n and "lora_" in n]
        self.frozen = [p for n, p in part.peft.named_parameters() if freeze_a and f".lora_A.{name}." in n]
        if freeze_a:  # ffa: A stays at the shared initialisation, only B trains
            self.params = [p for n, p in part.peft.named_parameters() if f".lora_B.{name}." in n]
        self.opt, self.sched = build_optimizer(self.params, settings)

    def capture(self, part: SplitPart) -> SlotState:
        return capture_slot(part.peft, self.name, self.opt, self.sched)

    def restore(self, part: SplitPart, state: SlotState) -> None:
        restore_slot(part.peft, state, self.opt, self.sched)


class Slots:
    """Every server adapter of the part, keyed by client id (per-client mode) or SHARED."""

    def __init__(self, part: SplitPart, mode: AdapterMode, optim: OptimSettings, strategy: Strategy,
                 points: SplitPoints | None = None) -> None:
        if mode not in ("shared", "per-client"):
            raise ValueError(f"server adapter mode {mode!r} is not 'shared' or 'per-client'")
        self.part, self.mode, self.optim, self.strategy = part, mode, optim, strategy
        self.points = points or SplitPoints(part.segment.start, part.segment.start, part.family.layers_path)
        self.split_layers: dict[str, int] = {}  # each client's split layer (checkpointed)
        # ffa: A frozen wherever copies are averaged (per-client copies; with split points, the shared one too)
        self.freeze_a = (mode == "per-client" or self.points.ranged) and strategy.freezes_lora_a
        self.folder = ResidualFolder(part.peft, SHARED)  # fedex: the residuals folded into the base weights
        self.strategy_state: AdapterState = {}  # what the strategy returned beyond the adapter (checkpointed)
        self.by_key: dict[str, Slot] = {SHARED: Slot(part, SHARED, optim, self.freeze_a)}
        # the round boundary: the round whose start the snapshots hold (rollbacks of a client's partial round
        # restore its slot from them) and, in shared mode, who has stepped the shared adapter since then
        self.boundary_round = 0
        self.snapshots: dict[str, SlotState] = {SHARED: self.by_key[SHARED].capture(part)}
        self.incidents: list[str] = []  # rounds whose average was not finite (shown by status)
        self.touched: set[str] = set()

    def of(self, client_id: str) -> Slot:
        """The slot a client's steps train."""
        return self.by_key[client_id if self.mode == "per-client" else SHARED]

    def activate(self, client_id: str) -> Slot:
        """Make the client's slot the part's active adapter, in training mode."""
        slot = self.of(client_id)
        self.part.peft.set_adapter(slot.name)  # (makes every parameter of the adapter trainable)
        for param in slot.frozen:
            param.requires_grad_(False)
        self.part.train()
        return slot

    def add_client(self, client_id: str, split_layer: int | None = None) -> str | None:
        """Record the client's split layer (an error message if it differs from the one it trained with so far);
        per-client mode: give a new client its own copy of the server adapter."""
        split_layer = self.points.low if split_layer is None else split_layer
        known = self.split_layers.setdefault(client_id, split_layer)
        if known != split_layer:
            return (f"client {client_id} trains with split layer {known} in this run; it cannot change to "
                    f"{split_layer} (give it --split-layer {known})")
        if self.mode != "per-client" or client_id in self.by_key:
            return None
        names, i = {slot.name for slot in self.by_key.values()}, len(self.by_key)
        while f"client{i}" in names:  # restored slots keep their names
            i += 1
        name = f"client{i}"  # client ids may hold '.', which peft adapter names must not
        self._new(client_id, name)
        load_adapter_state(self.part.peft, adapter_state(self.part.peft, SHARED), name)
        self.snapshots[client_id] = self.by_key[client_id].capture(self.part)
        return None

    def _new(self, key: str, name: str) -> Slot:
        self.part.peft.add_adapter(name, self.part.lora_config())
        self.by_key[key] = Slot(self.part, name, self.optim, self.freeze_a)
        return self.by_key[key]

    def server_updates(self, weights: dict[str, float]) -> list[ClientUpdate]:
        """The server's copies of the blocks trained on both sides, for the aggregator (engine.split_points)."""
        if not self.points.ranged:
            return []
        if self.mode == "shared":
            return shared_updates(self.points, adapter_state(self.part.peft, SHARED), self.split_layers, weights)
        states = {c: adapter_state(self.part.peft, self.by_key[c].name) for c in weights if c in self.by_key}
        return per_client_updates(self.points, states, self.split_layers, weights)

    def take_overlap(self, overlap: AdapterState) -> None:
        """The blocks trained on both sides, as the aggregator combined them, into every copy."""
        mine = self.points.overlap_of(overlap)
        for slot in self.by_key.values():
            load_adapter_state(self.part.peft, mine, slot.name, partial=True)

    def average(self, rnd: int, weights: dict[str, float], overlap: AdapterState | None = None) -> None:
        """Per-client mode: the strategy's average of the clients' adapters (sample weights) into every copy;
        with split points, the overlapping blocks come from `overlap` (the aggregator's combination)."""
        if overlap:
            self.take_overlap(overlap)
        if self.mode != "per-client":
            return
        clients = sorted(c for c in weights if c in self.by_key and c != SHARED)  # a fixed order: bit-reproducible
        if not clients:
            return
        outside = self.points.outside_overlap
        updates = [ClientUpdate(c, outside(adapter_state(self.part.peft, self.by_key[c].name)), weights[c])
                   for c in clients]
        shared = outside(adapter_state(self.part.peft, SHARED))
        result, incident = guarded_aggregate(self.strategy, rnd, updates, {**shared, **self.strategy_state})
        if incident:  # never a non-finite server adapter: the previous average is kept
            self.incidents.append(f"round {rnd}, per-client server adapters: {incident}")
            log.error("round %d, per-client server adapters: %s", rnd, incident)
        if result is None:
            return
        merged = {k: result[k] for k in shared}
        for slot in self.by_key.values():
            load_adapter_state(self.part.peft, merged, slot.name, partial=self.points.ranged)
        self.strategy_state = {k: v for k, v in result.items() if k not in shared}  # e.g. fedex's residuals
        self.folder.fold(split_residuals(self.strategy_state)[1])

    def take_boundary(self, rnd: int, clients: list[str], steps: int) -> ServerState:
        """Round `rnd` is over: snapshot every slot as the state from which round rnd+1 starts."""
        self.boundary_round, self.touched = rnd + 1, set()
        self.snapshots = {key: slot.capture(self.part) for key, slot in self.by_key.items()}
        return ServerState(rnd + 1, dict(self.snapshots), list(clients), steps, dict(self.strategy_state),
                           dict(self.split_layers))

    def rollback(self, client_id: str, rnd: int) -> bool:
        """Undo a client's partial round `rnd` from the boundary snapshot; in shared mode only while nobody else
        has stepped the shared adapter since."""
        if rnd != self.boundary_round:
            return False  # the round has closed meanwhile: the slot already holds the next boundary
        key = client_id if self.mode == "per-client" else SHARED
        if key == SHARED and not self.touched <= {client_id}:
            log.warning("client %s redoes round %d, but other clients have stepped the shared server adapter since "
                        "it started; its partial steps stay in (use --server-adapter-mode per-client for exact "
                        "recovery)", client_id, rnd)
            return False
        if key in self.by_key and key in self.snapshots:
            self.by_key[key].restore(self.part, self.snapshots[key])
        self.touched.discard(client_id)
        return True

    def restore(self, state: ServerState) -> None:
        """Resume from a checkpoint: recreate the slots under their adapter names and load their states."""
        for key, slot_state in state.slots.items():
            slot = self.by_key.get(key) or self._new(key, slot_state.name)
            slot.restore(self.part, slot_state)
        self.boundary_round, self.touched = state.round, set()
        self.snapshots = dict(state.slots)
        self.strategy_state = dict(state.strategy_state)
        self.split_layers = dict(state.split_layers)
        self.folder.fold(split_residuals(self.strategy_state)[1])

    def adapter(self, client_id: str) -> AdapterState:
        """A copy of the adapter a client's steps update (the shared one for unknown clients)."""
        return adapter_state(self.part.peft, self.by_key.get(client_id, self.by_key[SHARED]).name)

    def export_state(self) -> AdapterState:
        """The shared adapter and, with fedex, the residuals folded into the base weights (what export needs)."""
        return {**adapter_state(self.part.peft, SHARED), **self.folder.residuals}
