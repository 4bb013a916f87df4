"""What both sides must agree on before they train together, and a readable comparison of two fingerprints."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split import family_for
from common.split.parts import LoraSettings, load_config, side_tensor_names
from common.weights import CheckpointIndex

# Config keys that describe how a checkpoint was saved or loaded, not the function it computes.
_VOLATILE_KEYS = {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "architectures",
                  "use_cache", "output_attentions", "output_hidden_states", "return_dict"}

_FIELDS = {
    "family": "model family", "config_sha256": "base model config", "index_sha256": "checkpoint tensor index",
    "client_weights_sha256": "client-side base weights", "split_layer": "split layer",
    "lora_sha256": "LoRA config", "num_layers": "number of layers", "hidden_size": "hidden size",
    "vocab_size": "vocabulary size",
}


def config_sha256(config) -> str:
    """Hash of the model config, ignoring keys that do not change the model's function."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def compute_fingerprint(model_dir: str | Path, split_layer: int, lora: LoraSettings) -> spb.Fingerprint:
    """The fingerprint of a checkpoint cut at `split_layer`; the same on the client and on the server."""
    config = load_config(model_dir)
    family = family_for(config.model_type)
    index = CheckpointIndex(model_dir)
    return spb.Fingerprint(
        family=family.name, config_sha256=config_sha256(config), index_sha256=index.index_sha256(),
        client_weights_sha256=index.bytes_sha256(side_tensor_names(model_dir, "client", split_layer)),
        split_layer=split_layer, lora_sha256=lora.sha256(family), num_layers=family.num_layers(config),
        hidden_size=int(config.hidden_size), vocab_size=int(config.vocab_size))


def check_split_layer_of(expected: dict[int, spb.Fingerprint], got: spb.Fingerprint) -> tuple[str, str] | None:
    """None when `got` matches the fingerprint of its own split layer among `expected` (one per split layer the
    server allows); else ("range", why) for a split layer the server does not allow (with several), or ("model",
    why) for anything that differs."""
    mine = expected.get(got.split_layer)
    if mine is None and len(expected) > 1:
        low, high = min(expected), max(expected)
        return "range", (f"split layer {got.split_layer} is outside the server's --split-range {low}:{high}; choose "
                         "one in it (splitlora-client train --split-layer K, or auto with --max-memory)")
    diff = differences(mine or next(iter(expected.values())), got)
    return ("model", "the client's model does not match the server's: " + "; ".join(diff)) if diff else None


def differences(expected: spb.Fingerprint, got: spb.Fingerprint) -> list[str]:
    """Human-readable list of what differs, e.g. 'split layer: server 3, client 2'."""
    out = []
    for name, label in _FIELDS.items():
        want, have = getattr(expected, name), getattr(got, name)
        if want != have:
            show = (lambda v: str(v)[:12]) if name.endswith("sha256") else (lambda v: str(v)[:64])  # bounded echo
            out.append(f"{label}: server {show(want)}, client {show(have)}")
    return out
