"""Read Hugging Face safetensors checkpoints tensor by tensor, single-file or sharded.

Only safetensors is read: `.bin` checkpoints are pickles and are refused.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The model directory or its checkpoint cannot be used; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    base = 8 + length
    return {name: TensorInfo(path, meta["dtype"], tuple(meta["shape"]), base + meta["data_offsets"][0],
                             base + meta["data_offsets"][1])
            for name, meta in header.items() if name != "__metadata__"}


class CheckpointIndex:
    """The tensors of a checkpoint directory: names, dtypes, shapes and where their bytes are."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model directory {self.model_dir} does not exist")
        self.tensors: dict[str, TensorInfo] = {}
        index_path, single = self.model_dir / INDEX_FILE, self.model_dir / SINGLE_FILE
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            for file in sorted(set(weight_map.values())):
                shard = self.model_dir / file
                if not shard.exists():
                    raise CheckpointError(f"{index_path} names shard {file}, which is missing")
                self.tensors.update(_read_header(shard))
        elif single.exists():
            self.tensors = _read_header(single)
        else:
            found = sorted(p.name for p in self.model_dir.iterdir())
            hint = " (.bin checkpoints are pickles and are not loaded; convert them to safetensors)" \
                if any(n.endswith(".bin") for n in found) else ""
            raise CheckpointError(f"{self.model_dir} has no {SINGLE_FILE} or {INDEX_FILE}{hint}; found {found}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def index_sha256(self) -> str:
        """Hash of every tensor's name, dtype and shape."""
        listing = [[n, t.dtype, list(t.shape)] for n, t in sorted(self.tensors.items())]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def bytes_sha256(self, names: list[str]) -> str:
        """Hash of the stored bytes of the named tensors, read straight from the files."""
        digest = hashlib.sha256()
        for name in sorted(names):
            info = self.tensors[name]
            digest.update(name.encode())
            with info.file.open("rb") as f:
                f.seek(info.start)
                remaining = info.end - info.start
                while remaining:
                    block = f.read(min(remaining, 1 << 24))
                    if not block:
                        raise CheckpointError(f"{info.file} is truncated inside tensor {name}")
                    digest.update(block)
                    remaining -= len(block)
        return digest.hexdigest()

    def load(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Load only the named tensors (optionally cast floats to `dtype`)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out
