"""The parts of a label-private (U-shaped) split of one model: client bottom `[0, K)` with the embeddings, server
middle `[K, L-J)`, client top `[L-J, L)` with the final norm and the head (docs/privacy.md)."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from common.lora import adapter_state, load_adapter_state
from common.split import family_for
from common.split.loading import load_config
from common.split.segment import Segment, u_shape_segments


def u_shape_parts(model_dir: str | Path, split_layer: int, top_blocks: int) -> tuple[Segment, Segment, Segment]:
    """Bottom, middle and top segments of the model in `model_dir` cut at K=`split_layer` and L-J (checked)."""
    config = load_config(model_dir)
    return u_shape_segments(split_layer, top_blocks, family_for(config.model_type).num_layers(config))


def load_client_adapter(bottom: PeftModel, top: PeftModel | None, state: dict[str, torch.Tensor]) -> None:
    """Load a client adapter (bottom part's tensors, and in u-shape mode the top part's: disjoint keys) into the
    part(s), checked per part."""
    if top is None:
        load_adapter_state(bottom, state)
        return
    bottom_keys = set(adapter_state(bottom))
    load_adapter_state(bottom, {k: v for k, v in state.items() if k in bottom_keys})
    load_adapter_state(top, {k: v for k, v in state.items() if k not in bottom_keys})
