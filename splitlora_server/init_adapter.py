"""`serve --init-adapter DIR`: both sides start from an existing whole-model PEFT adapter (e.g. an earlier export).

The server checks the adapter against its model and LoRA options (its header's provenance when it has one, and
always the tensors of the server part), loads the server part, and hands the client part to every client with
the plan; each client checks that part against its own blocks when it loads it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from common.lora import ADAPTER_WEIGHTS, AdapterError, adapter_state, check_adapter, load_adapter_state, to_bytes
from common.provenance import model_of, read_provenance
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.parts import SplitPart

# options an earlier run may have used differently without changing the adapter's meaning
_FREE = ("split_layer", "lora_dropout")


@dataclass
class InitialAdapter:
    """The client part (safetensors bytes, for the plan) and a digest of the whole file (for the run identity)."""

    client_bytes: bytes
    sha256: str


def _check_provenance(path: Path, fingerprint: spb.Fingerprint, options_json: str) -> None:
    prov = read_provenance(path)
    if prov is None:
        return  # an adapter written by peft itself: its tensors are checked below
    theirs, ours = prov.model, model_of(fingerprint)
    diff = [f"{k} {str(theirs.get(k))[:12]} vs {str(ours[k])[:12]}" for k in ours if theirs.get(k) != ours[k]]
    if diff:
        raise AdapterError(f"--init-adapter {path.parent} was trained on another model than --model ("
                           + "; ".join(diff) + ")")
    run, adapter = json.loads(options_json), prov.options
    diff = [f"--{k.replace('_', '-')} {adapter.get(k)} in the adapter, {run[k]} here" for k in run
            if k not in _FREE and k in adapter and adapter[k] != run[k]]
    if diff:
        raise AdapterError(f"--init-adapter {path.parent} was trained with other LoRA options: " + "; ".join(diff))


def load_initial_adapter(directory: str | Path, part: SplitPart, fingerprint: spb.Fingerprint,
                         options_json: str) -> InitialAdapter:
    """Load the server part of the adapter in `directory` into `part`; return the client part."""
    path = Path(directory) / ADAPTER_WEIGHTS
    _check_provenance(path, fingerprint, options_json)
    state = load_file(str(path))
    reference = adapter_state(part.peft)
    server_state = {k: v for k, v in state.items() if k in reference}
    check_adapter(server_state, reference, f"--init-adapter {directory} (the server's blocks)")
    load_adapter_state(part.peft, server_state)
    client_state = {k: v for k, v in state.items() if k not in reference}
    if not client_state:
        raise AdapterError(f"--init-adapter {directory} has no tensors for the client's blocks")
    return InitialAdapter(to_bytes(client_state), hashlib.sha256(path.read_bytes()).hexdigest())
