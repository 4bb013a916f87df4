"""What an adapter file was trained with, in its safetensors header: the model, the split and the LoRA options.

Every adapter file the roles write (client, server, exported whole-model) carries it, so that `export` and
`serve --init-adapter` need no repeated flags and refuse pieces that do not belong together, naming why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.atomic import read_safetensors_metadata
from common.rpc.splitlora.v1 import split_pb2 as spb

PREFIX = "splitlora."
MODEL_KEYS = ("family", "config_sha256", "index_sha256", "num_layers", "hidden_size", "vocab_size")


@dataclass(frozen=True)
class Provenance:
    """Where an adapter comes from: `side` is client, server or model (whole-model export)."""

    side: str
    split_layer: int
    model_options_json: str  # common.plan.options_json of the run
    model: dict[str, str]    # the model part of the fingerprint, MODEL_KEYS
    base_model: str = ""     # the model directory it was trained on, as that machine named it

    def to_metadata(self) -> dict[str, str]:
        """Safetensors header entries (strings only)."""
        return {PREFIX + "side": self.side, PREFIX + "split_layer": str(self.split_layer),
                PREFIX + "model_options": self.model_options_json, PREFIX + "model": json.dumps(self.model),
                PREFIX + "base_model": self.base_model}

    @property
    def options(self) -> dict:
        return json.loads(self.model_options_json)

    def model_differences(self, other: "Provenance") -> list[str]:
        """What differs between the models of two adapters."""
        return [f"{k}: {str(self.model.get(k))[:12]} vs {str(other.model.get(k))[:12]}" for k in MODEL_KEYS
                if self.model.get(k) != other.model.get(k)]


def model_of(fingerprint: spb.Fingerprint) -> dict[str, str]:
    """The model part of a handshake fingerprint (not the split, not LoRA)."""
    return {k: str(getattr(fingerprint, k)) for k in MODEL_KEYS}


def provenance(side: str, fingerprint: spb.Fingerprint, model_options_json: str, base_model: str = "") -> Provenance:
    """The provenance of an adapter trained with this fingerprint and these planned options."""
    return Provenance(side, int(fingerprint.split_layer), model_options_json, model_of(fingerprint), base_model)


def read_provenance(path: str | Path) -> Provenance | None:
    """The provenance in an adapter file's header; None for a file written without it."""
    meta = read_safetensors_metadata(Path(path))
    if PREFIX + "side" not in meta:
        return None
    try:
        return Provenance(meta[PREFIX + "side"], int(meta[PREFIX + "split_layer"]), meta[PREFIX + "model_options"],
                          json.loads(meta[PREFIX + "model"]), meta.get(PREFIX + "base_model", ""))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: unreadable splitlora header entry: {err}") from err
