"""Does a pair of client and server adapters fit a whole model under a LoRA config? Checked before exporting."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from common.lora import AdapterError, AdapterState, check_adapter
from common.split.parts import load_config

_BLOCK = re.compile(r"\.(\d+)\.")


def _blocks(state: AdapterState) -> set[int]:
    return {int(m.group(1)) for key in state if (m := _BLOCK.search(key))}


def expected_layout(model_dir: str | Path, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The whole model's adapter keys and shapes under `config` (as meta tensors: nothing is read or allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # peft
        model = AutoModelForCausalLM.from_config(load_config(model_dir))
        peft = get_peft_model(model, LoraConfig(**config.to_dict()))
    return dict(get_peft_model_state_dict(peft))


def check_whole_model_layout(model_dir: str | Path, config: LoraConfig, split_layer: int, client: AdapterState,
                             server: AdapterState) -> None:
    """AdapterError naming the first problem: blocks on the wrong side of the split, overlapping or missing
    tensors, or shapes another rank or model would have."""
    ours, theirs = _blocks(client), _blocks(server)
    if (ours and max(ours) != split_layer - 1) or (theirs and min(theirs) != split_layer):
        raise AdapterError(f"the adapters are not of split layer {split_layer}: the client adapter holds blocks "
                           f"{sorted(_blocks(client))}, the server adapter blocks {sorted(_blocks(server))} (were "
                           "they trained with different split layers?)")
    overlap = sorted(set(client) & set(server))
    if overlap:
        raise AdapterError(f"the client and server adapters overlap on {overlap[:3]}")
    try:
        check_adapter({**client, **server}, expected_layout(model_dir, config), "the adapters")
    except AdapterError as err:
        raise AdapterError(f"{err} (model {model_dir}, LoRA r={config.r}, targets "
                           f"{sorted(config.target_modules)}): were they trained with other options or another "
                           "model?") from None
