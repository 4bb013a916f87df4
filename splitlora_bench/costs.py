"""What one step and one round cost, per method, and the modeled wall time it implies on a device profile."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from splitlora_bench import profiles as pf
from splitlora_bench.evaluate import full_model
from splitlora_bench.flops import step_flops
from common.lora import adapter_state, to_bytes
from common.split.parts import LoraSettings, SplitPart


@dataclass(frozen=True)
class Cost:
    """FLOPs per step (client part, server part, whole model), bytes per split step each way, adapter bytes."""

    model: str
    seq: int
    client_flops: int
    server_flops: int
    full_flops: int
    bytes_up: float
    bytes_down: float
    client_adapter_bytes: int
    full_adapter_bytes: int
    int8_ratio: float = 1.0  # bytes per step with float32 over bytes with int8 (activations and gradients)

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def step_bytes(batch: int, seq: int, hidden: int, value_bytes: int = 4, row_bytes: int = 0) -> tuple[float, float]:
    """Bytes of a step each way: activations + uint8 mask + int32 labels and positions up, gradient down, with
    `value_bytes` per value and `row_bytes` per token row (int8: 1 and 4; protobuf framing left out)."""
    per_token = hidden * value_bytes + row_bytes
    return batch * seq * (per_token + 9), batch * seq * per_token


def measure_cost(model: Path, split_layer: int, lora: LoraSettings, seed: int, batch: int, seq: int,
                 bytes_per_step: tuple[float, float] | None = None) -> Cost:
    """Count FLOPs on a probe batch of `batch` x `seq`; take bytes per step as measured, else computed."""
    client = SplitPart(model, "client", split_layer, lora, lora_seed=seed).train()
    server = SplitPart(model, "server", split_layer, lora, lora_seed=seed).train()
    whole = full_model(model, lora).train()
    flops = step_flops(client, server, whole, batch, seq)
    up, down = bytes_per_step or step_bytes(batch, seq, server.hidden_size)
    int8 = sum(step_bytes(batch, seq, server.hidden_size, 1, 4))
    return Cost(model.name, seq, flops.client, flops.server, flops.full, up, down,
                len(to_bytes(adapter_state(client.peft))), len(to_bytes(adapter_state(whole))), (up + down) / int8)


def modeled_seconds(p: pf.Profile, c: Cost, clients: int, local_steps: int, rounds: int) -> dict[str, list[float]]:
    """Modeled training seconds at the end of rounds 0..R (0 = start) for each method."""
    cen = pf.cenlora_seconds(p, clients * local_steps, c.full_flops)
    fed = pf.fedlora_round_seconds(p, local_steps, c.full_flops, c.full_adapter_bytes)
    split = pf.splitlora_round_seconds(p, clients, local_steps, c.client_flops, c.server_flops, c.bytes_up,
                                       c.bytes_down, c.client_adapter_bytes)
    int8 = pf.splitlora_round_seconds(p, clients, local_steps, c.client_flops, c.server_flops,
                                      c.bytes_up / c.int8_ratio, c.bytes_down / c.int8_ratio, c.client_adapter_bytes)
    return {m: [r * per_round for r in range(rounds + 1)]
            for m, per_round in (("CenLoRA", cen), ("FedLoRA", fed), ("SplitLoRA", split), ("SplitLoRA-int8", int8))}


def first_reaching(losses: list[float], target: float) -> int | None:
    """Index of the first evaluation at or below `target`."""
    return next((i for i, loss in enumerate(losses) if loss <= target), None)
