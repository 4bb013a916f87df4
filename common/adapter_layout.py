"""The layout an adapter must have, from the model and LoRA configuration, and uploads checked against it.

`adapter_layout` builds one side of the model on the meta device (no weights read, no memory) with its LoRA
adapters and lists their keys and shapes: the aggregator takes its layout from there, never from whoever submits
first. `UploadCheck` reads a safetensors upload piece by piece: it checks the header (keys, float32 dtype, shapes,
offsets) as soon as it is in and knows the exact size the upload must have, before any tensor is built and
without holding more than that size.
"""
from __future__ import annotations

import json
import math
import re
import struct
import warnings
from pathlib import Path

from accelerate import init_empty_weights
from peft import get_peft_model, get_peft_model_state_dict

from common.split import family_for
from common.split.loading import load_config, skeleton
from common.split.segment import Segment, Side
from common.split.parts import LoraSettings

Layout = dict[str, tuple[int, ...]]
ADAPTER_DTYPE = "F32"  # adapters are float32 on every side (common.lora.adapter_state)
MAX_HEADER_BYTES = 16 << 20


def block_of(key: str, layers_path: str) -> int | None:
    """The block index of an adapter key (`...<layers_path>.<i>....`), None for a module outside the blocks."""
    match = re.search(rf"(?:^|\.){re.escape(layers_path)}\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def in_blocks(state: dict, layers_path: str, blocks: range) -> dict:
    """The entries of `state` whose key belongs to one of `blocks`."""
    return {k: v for k, v in state.items() if block_of(k, layers_path) in blocks}


class LayoutError(ValueError):
    """An upload does not have the layout of the run's adapter; the message says how."""


def adapter_layout(model_dir: str | Path, side: Side, split_layer: int, lora: LoraSettings) -> Layout:
    """Keys and shapes of one side's LoRA adapter, as `common.lora.adapter_state` names them."""
    config = load_config(model_dir)
    family = family_for(config.model_type)
    base = skeleton(config, family, Segment.of_side(side, split_layer, family.num_layers(config)))
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(base, lora.peft_config(family))
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft).items()}


def layout_bytes(layout: Layout) -> int:
    """Bytes of the tensors of an adapter of this layout."""
    return sum(math.prod(shape) * 4 for shape in layout.values())


def check_header(header: dict, layout: Layout) -> int:
    """Check a safetensors header against `layout`; return the byte count of its tensor data."""
    names = {k for k in header if k != "__metadata__"}
    missing, extra = sorted(set(layout) - names), sorted(names - set(layout))
    if missing or extra:
        raise LayoutError(f"keys differ from the run's adapter: missing {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}, unexpected {[k[:80] for k in extra[:3]]}"
                          f"{'...' if len(extra) > 3 else ''}")
    spans = []
    for key, shape in layout.items():
        entry = header[key]
        if not isinstance(entry, dict) or entry.get("dtype") != ADAPTER_DTYPE:
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            raise LayoutError(f"tensor {key} has dtype {str(dtype)[:16]}, the adapter's dtype is float32")
        if entry.get("shape") != list(shape):
            raise LayoutError(f"tensor {key} has shape {str(entry.get('shape'))[:80]}, expected {list(shape)}")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and offsets[1] - offsets[0] == math.prod(shape) * 4):
            raise LayoutError(f"tensor {key} has data offsets {str(offsets)[:80]} that do not fit its shape")
        spans.append(tuple(offsets))
    spans.sort()
    end = 0
    for start, stop in spans:
        if start != end:
            raise LayoutError("tensor data offsets overlap or leave gaps")
        end = stop
    return end


class UploadCheck:
    """Receives an upload piece by piece; refuses it (LayoutError) as soon as it cannot fit `layout`."""

    def __init__(self, layout: Layout, max_bytes: int) -> None:
        self.layout, self.max_bytes = layout, max_bytes
        self.buffer = bytearray()
        self.expected: int | None = None  # the exact size, once the header is in

    def add(self, piece: bytes) -> None:
        """Append one piece (the caller drops its own copy)."""
        limit = self.expected if self.expected is not None else self.max_bytes
        if len(self.buffer) + len(piece) > limit:
            raise LayoutError(f"the upload is larger than {limit} bytes, the size of an adapter of this run")
        self.buffer += piece
        if self.expected is None and len(self.buffer) >= 8:
            (header_len,) = struct.unpack("<Q", self.buffer[:8])
            if header_len > min(MAX_HEADER_BYTES, self.max_bytes):
                raise LayoutError(f"the safetensors header announces {header_len} bytes")
            if len(self.buffer) >= 8 + header_len:
                self.expected = 8 + header_len + self._header(bytes(self.buffer[8:8 + header_len]))
                if len(self.buffer) > self.expected:
                    raise LayoutError(f"the upload is larger than the {self.expected} bytes its header announces")

    def _header(self, raw: bytes) -> int:
        try:
            header = json.loads(raw)
        except ValueError as err:
            raise LayoutError(f"the safetensors header is not JSON: {str(err)[:80]}") from None
        if not isinstance(header, dict):
            raise LayoutError("the safetensors header is not a JSON object")
        return check_header(header, self.layout)

    def finish(self) -> bytes:
        """The whole upload; LayoutError if it is incomplete."""
        if self.expected is None or len(self.buffer) != self.expected:
            raise LayoutError(f"the upload ended after {len(self.buffer)} bytes, before the adapter was complete")
        data, self.buffer = bytes(self.buffer), bytearray()
        return data
