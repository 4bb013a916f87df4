"""Read Hugging Face safetensors checkpoints tensor by tensor, single-file or sharded.

Only safetensors is read: `.bin` checkpoints are pickles and are refused. A model may be named by a local
directory or by a Hugging Face hub id (`resolve_model_dir`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class CheckpointError(ValueError):
    """The model directory or its checkpoint cannot be used; the message says why."""


def looks_local(name: str) -> bool:
    """True for names that can only be a local path (never a hub id)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _hub_reason(err: Exception) -> str:
    """A one-line reason for a failed hub download."""
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return "the repository is gated (accept its terms and log in first)"
    if isinstance(err, errors.RepositoryNotFoundError):
        return "no such repository on the hub (or it is private)"
    if isinstance(err, errors.RevisionNotFoundError):
        return "the requested revision does not exist"
    if isinstance(err, errors.HFValidationError):
        return "not a valid hub repository id"
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return "offline or the hub is unreachable, and no cached copy was found"
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


@functools.lru_cache(maxsize=32)
def _download(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # any failure of the hub client becomes one clear message
        raise CheckpointError(f"model {name!r} is not a local directory and could not be downloaded from the "
                              f"Hugging Face hub: {_hub_reason(err)}; pass a local directory") from None


def resolve_model_dir(name: str | Path) -> Path:
    """A local model directory as is; otherwise the snapshot of hub id `name` (config, safetensors, tokenizer)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if looks_local(str(name)):
        raise CheckpointError(f"model {str(name)!r} is not a local directory and could not be downloaded from the "
                              "Hugging Face hub: no such directory, and not a hub id; pass a local directory")
    return _download(str(name))


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


def _read_sharded(model_dir: Path, index_path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a sharded checkpoint, checking the index against the shards' own headers."""
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a readable checkpoint index ({err!r})") from err
    tensors: dict[str, TensorInfo] = {}
    for file in sorted(set(weight_map.values())):
        shard = model_dir / file
        if not shard.is_file():
            raise CheckpointError(f"{index_path} names shard {file}, which is missing")
        tensors.update(_read_header(shard))
    for name, file in weight_map.items():
        if name not in tensors or tensors[name].file.name != Path(file).name:
            raise CheckpointError(f"{index_path} places tensor {name} in {file}, but that shard does not hold it")
    return tensors


class CheckpointIndex:
    """The tensors of a checkpoint directory: names, dtypes, shapes and where their bytes are."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = resolve_model_dir(model_dir)
        index_path, single = self.model_dir / INDEX_FILE, self.model_dir / SINGLE_FILE
        if index_path.exists():
            self.tensors = _read_sharded(self.model_dir, index_path)
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
        """Hash of every tensor's name, dtype and shape (the same for a sharded and a single-file copy)."""
        listing = [[n, t.dtype, list(t.shape)] for n, t in sorted(self.tensors.items())]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def bytes_sha256(self, names: list[str]) -> str:
        """Hash of the stored bytes of the named tensors, read straight from the files."""
        digest = hashlib.sha256()
        for name in sorted(names):
            info = self._info(name)
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

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.model_dir}: tensor {name} is not in the checkpoint")
        return self.tensors[name]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as a copy of its own (a float cast to `dtype`), read from the file without mapping it."""
        info = self._info(name)
        if info.shape:
            return self.read_rows(name, 0, info.shape[0], dtype)
        t = self._read(name, info, 0, 1, ()).reshape(())  # a scalar: one row of no elements' shape
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (along its first dimension) as a copy of their own, floats cast to
        `dtype`: only those rows' bytes are read (plain reads, no mapping), so a big tensor can be processed in
        chunks without ever being resident whole."""
        info = self._info(name)
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise CheckpointError(f"{self.model_dir}: rows [{start}, {stop}) are not in tensor {name} of shape "
                                  f"{list(info.shape)}")
        t = self._read(name, info, start, stop - start, info.shape[1:])
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def _read(self, name: str, info: TensorInfo, first: int, rows: int, row_shape: tuple[int, ...]) -> torch.Tensor:
        stored = STORED_DTYPES.get(info.dtype)
        if sys.byteorder != "little":  # safetensors stores little-endian bytes
            raise CheckpointError(f"{info.file}: reading safetensors needs a little-endian machine")
        if stored is None:
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, which is not read")
        row_bytes = math.prod(row_shape) * stored.itemsize
        if info.end - info.start != math.prod(info.shape) * stored.itemsize:
            raise CheckpointError(f"{info.file}: tensor {name} spans {info.end - info.start} bytes, not the "
                                  f"{math.prod(info.shape) * stored.itemsize} its shape {list(info.shape)} needs")
        out = torch.empty(rows * row_bytes, dtype=torch.uint8)
        view, done = memoryview(out.numpy()), 0
        with info.file.open("rb", buffering=0) as f:
            f.seek(info.start + first * row_bytes)
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{info.file} is truncated inside tensor {name}")
                done += got
        return out.view(stored).reshape(rows, *row_shape)

    def load(self, names: list[str], dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load only the named tensors onto `device`, shard by shard (floats optionally cast to `dtype`)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._info(name).file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out
