"""LoRA adapter state in and out: extraction, validated loading, safetensors bytes and whole-model export."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.integrity import read_verified, write_with_digest

from common.residuals import expand_residuals

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
AdapterState = dict[str, torch.Tensor]


class AdapterError(ValueError):
    """An adapter does not fit the model it is meant for; the message says how."""


def _live_state(model: PeftModel, adapter_name: str) -> AdapterState:
    return get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)


def adapter_state(model: PeftModel, adapter_name: str = "default") -> AdapterState:
    """A detached float32 CPU copy of one adapter, keyed as in a saved PEFT adapter. Only the trained tensors:
    with an embedding or head target, peft would also save the frozen base matrix (vocabulary-sized)."""
    state = _live_state(model, adapter_name)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def check_adapter(state: AdapterState, reference: AdapterState, what: str = "adapter", against: str = "the model's",
                  values: bool = True) -> None:
    """Refuse an adapter whose keys or shapes do not fit `reference` (`against` names it in the message), or,
    with `values`, whose tensors are not float or not finite. The one adapter-layout check of the tree."""
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:
        raise AdapterError(f"{what} keys differ from {against}: missing {missing[:3]}"
                           f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key, ref in reference.items():
        value = state[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise AdapterError(f"{what} tensor {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if not values:
            continue
        if value.dtype != torch.float32:  # the adapter's own dtype: a float64 1e300 would overflow when averaged
            raise AdapterError(f"{what} tensor {key} has dtype {value.dtype}, the adapter's dtype is float32")
        if not torch.isfinite(value).all():
            raise AdapterError(f"{what} tensor {key} contains NaN or Inf")


def load_adapter_state(model: PeftModel, state: AdapterState, adapter_name: str = "default",
                       partial: bool = False) -> None:
    """Copy `state` into the model's adapter in place (optimizer references stay valid) after checking it;
    `partial`: `state` may hold only some of the adapter's tensors (the others stay)."""
    current = _live_state(model, adapter_name)
    if partial:
        current = {k: v for k, v in current.items() if k in state}
    check_adapter(state, current)
    with torch.no_grad():
        for key, param in current.items():
            param.copy_(state[key].to(param.dtype))
    # get_peft_model_state_dict returns the live parameters, so copying in place keeps optimizer references valid
    # (peft's set_peft_model_state_dict would swap tensors under the optimizer).


def to_bytes(state: AdapterState, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize an adapter as safetensors bytes (`metadata`: extra header entries)."""
    return st_save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt", **(metadata or {})})


def from_bytes(data: bytes) -> AdapterState:
    """Parse safetensors bytes, with a clear error for anything else."""
    try:
        return dict(st_load(data))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise AdapterError(f"adapter is not valid safetensors data: {err}") from err


def write_adapter_file(path: Path, state: AdapterState, metadata: dict[str, str] | None = None) -> None:
    """Write an adapter state to a safetensors file atomically, with its SHA-256 next to it (common.integrity);
    `metadata`: extra header entries (e.g. common.provenance)."""
    write_with_digest(Path(path), to_bytes(state, metadata))


def read_adapter_file(path: Path) -> AdapterState:
    """Read an adapter file after checking it against its SHA-256 (IntegrityError names a damaged file)."""
    return from_bytes(read_verified(Path(path)))


def export_adapter(out_dir: str | Path, config: LoraConfig, *states: AdapterState,
                   base_model: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write a standard PEFT adapter directory for the whole model from the adapters of its parts: the weights
    and the config as `PeftModel.save_pretrained` writes them (`inference_mode` true, the task type kept); fedex
    residuals in them become exact higher-rank modules (common.residuals.expand_residuals); `metadata`: extra
    header entries of its safetensors file."""
    out = Path(out_dir)
    merged: AdapterState = {}
    for state in states:
        overlap = set(merged) & set(state)
        if overlap:
            raise AdapterError(f"adapter parts overlap on {sorted(overlap)[:3]}")
        merged.update(state)
    merged, config = expand_residuals(merged, config)
    config = copy.deepcopy(config)
    config.base_model_name_or_path, config.inference_mode = base_model, True
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    write_adapter_file(out / ADAPTER_WEIGHTS, merged, metadata)
    return out
