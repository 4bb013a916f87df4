"""`serve --split-range K_MIN:K_MAX`: what the server needs to know for each allowed split layer (the fingerprint a
client of that K sends, the layout of its client adapter) and the range as the engine uses it. See
splitlora_server.engine.split_points for how the blocks trained on both sides are averaged."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.adapter_layout import Layout, adapter_layout
import grpc

from common.fingerprint import check_split_layer_of, compute_fingerprint
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.segment import check_split_layer
from common.split.ushape import u_shape_parts
from splitlora_server.engine.split_points import SplitPoints
from splitlora_server.errors import Refused
from splitlora_server.options import ServeConfig


@dataclass
class SplitRange:
    """The allowed split layers of a run, with each one's client fingerprint and client adapter layout."""

    points: SplitPoints
    fingerprints: dict[int, spb.Fingerprint]
    layouts: dict[int, Layout]
    default_layer: int  # --split-layer: the split layer of clients that choose none

    @property
    def default(self) -> spb.Fingerprint:
        """The fingerprint of the default split layer."""
        return self.fingerprints[self.default_layer]

    def layout_of(self, split_layer_of: Callable[[str], int | None]) -> Callable[[str], Layout]:
        """The client adapter layout of a client, from its split layer (the default one before it joined)."""
        return lambda client_id: self.layouts[split_layer_of(client_id) or self.default_layer]


def build_split_range(cfg: ServeConfig, model_dir: Path, layers_path: str, num_layers: int) -> SplitRange:
    """Fingerprints and layouts of every split layer in --split-range (only --split-layer without one); in u-shape
    mode every K must leave the server at least one block below L-J."""
    low, high = cfg.split_bounds()
    check_split_layer(high, num_layers)
    if cfg.u_shape:
        u_shape_parts(model_dir, high, cfg.top_blocks)  # SplitError naming the blocks when K_max leaves none
    lora, top = cfg.lora_settings(), cfg.top_blocks if cfg.u_shape else None
    layers = range(low, high + 1)
    return SplitRange(SplitPoints(low, high, layers_path),
                      {k: compute_fingerprint(model_dir, k, lora, cfg.u_shape, cfg.top_blocks) for k in layers},
                      {k: adapter_layout(model_dir, "client", k, lora, top) for k in layers}, cfg.split_layer)


def client_split_layer(fingerprints: dict[int, spb.Fingerprint], fingerprint: spb.Fingerprint) -> int:
    """The client's split layer, once its fingerprint matches the server's for that split layer; else `Refused`:
    INVALID_ARGUMENT for a split layer outside --split-range, FAILED_PRECONDITION for another model."""
    problem = check_split_layer_of(fingerprints, fingerprint)
    if problem:
        kind, why = problem
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT if kind == "range" else grpc.StatusCode.FAILED_PRECONDITION, why)
    return int(fingerprint.split_layer)
