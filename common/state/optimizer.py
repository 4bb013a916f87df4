"""Optimizer and scheduler states as tensors (safetensors) and plain values (JSON); nothing is pickled."""
from __future__ import annotations

from typing import Any

import torch

from common.atomic import Tensors
from common.state import CheckpointFormatError



def to_json(value: Any) -> Any:
    """Plain JSON values; tuples are tagged so that they come back as tuples (AdamW's betas)."""
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v) for v in value]}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointFormatError(f"cannot store a {type(value).__name__} in checkpoint metadata")


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(from_json(v) for v in value["__tuple__"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[Tensors, dict]:
    """An optimizer's state as tensors named `prefix.<param index>.<key>` plus JSON metadata."""
    state = opt.state_dict()
    tensors: Tensors = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().clone().cpu()
            else:
                plain.setdefault(str(index), {})[key] = to_json(value)
    meta = {"param_groups": to_json(state["param_groups"]), "plain": plain,
            "tensor_keys": {str(i): sorted(k for k, v in values.items() if isinstance(v, torch.Tensor))
                            for i, values in state["state"].items()}}
    return tensors, meta


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: Tensors, meta: dict, prefix: str) -> None:
    """Restore what `optimizer_state` saved (exact values: the next update is bit-identical)."""
    state: dict[int, dict[str, Any]] = {}
    for index, keys in meta["tensor_keys"].items():
        for key in keys:
            name = f"{prefix}.{index}.{key}"
            if name not in tensors:
                raise CheckpointFormatError(f"optimizer tensor {name} is missing from the checkpoint")
            state.setdefault(int(index), {})[key] = tensors[name].clone()  # never alias
    for index, values in meta["plain"].items():
        state.setdefault(int(index), {}).update(from_json(values))
    opt.load_state_dict({"state": state, "param_groups": from_json(meta["param_groups"])})


def scheduler_state(sched: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """A learning-rate scheduler's state as JSON values (the schedule function itself is rebuilt by the caller)."""
    return to_json(sched.state_dict())


def load_scheduler_state(sched: torch.optim.lr_scheduler.LRScheduler, meta: dict) -> None:
    """Restore what `scheduler_state` saved."""
    sched.load_state_dict(from_json(meta))
