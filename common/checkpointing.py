"""Crash-safe training checkpoints: atomic files, versioned round directories, optimizer state never pickled.

A checkpoint is a directory `round-NNNN/` (the state from which round NNNN starts) holding `state.safetensors`
(every tensor) and `manifest.json` (format version, role, round, the tensor file's sha256 and JSON metadata).
It is built in a temporary directory, every file flushed and fsynced, and renamed into place in one step, so a
process killed at any instant leaves either the previous checkpoint or the new one, never a torn one.
Optimizer and scheduler states are split into tensors (safetensors) and plain values (JSON); nothing is pickled.
(`common/checkpoint.py` is something else: it reads model weights.)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.integrity import settings_digest

FORMAT = "splitlora-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "state.safetensors"
_ROUND_DIR = re.compile(r"^round-(\d{4,})$")
Tensors = dict[str, torch.Tensor]


class CheckpointFormatError(ValueError):
    """A checkpoint cannot be read or does not belong to this run; the message says why."""


# ------------------------------------------------------------------------------------------------ atomic files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory: write, flush, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_tensors_atomic(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (and string metadata) as one safetensors file, atomically."""
    atomic_write_bytes(path, st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata))


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# ------------------------------------------------------------------------------- optimizer and scheduler state
def _jsonable(value: Any) -> Any:
    """Plain JSON values; tuples are tagged so that they come back as tuples (AdamW's betas)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointFormatError(f"cannot store a {type(value).__name__} in checkpoint metadata")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[Tensors, dict]:
    """An optimizer's state as tensors named `prefix.<param index>.<key>` plus JSON metadata."""
    state = opt.state_dict()
    tensors: Tensors = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().clone().cpu()
            else:
                plain.setdefault(str(index), {})[key] = _jsonable(value)
    meta = {"param_groups": _jsonable(state["param_groups"]), "plain": plain,
            "tensor_keys": {str(i): sorted(k for k, v in values.items() if isinstance(v, torch.Tensor))
                            for i, values in state["state"].items()}}
    return tensors, meta


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: Tensors, meta: dict, prefix: str) -> None:
    """Restore what `optimizer_state` saved (exact values: the next update is bit-identical)."""
    state: dict[int, dict[str, Any]] = {}
    for index, keys in meta["tensor_keys"].items():
        for key in keys:
            name = f"{prefix}.{index}.{key}"
            if name not in tensors:
                raise CheckpointFormatError(f"optimizer tensor {name} is missing from the checkpoint")
            state.setdefault(int(index), {})[key] = tensors[name].clone()  # never alias
    for index, values in meta["plain"].items():
        state.setdefault(int(index), {}).update(_from_json(values))
    opt.load_state_dict({"state": state, "param_groups": _from_json(meta["param_groups"])})


def scheduler_state(sched: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """A learning-rate scheduler's state as JSON values (the schedule function itself is rebuilt by the caller)."""
    return _jsonable(sched.state_dict())


def load_scheduler_state(sched: torch.optim.lr_scheduler.LRScheduler, meta: dict) -> None:
    """Restore what `scheduler_state` saved."""
    sched.load_state_dict(_from_json(meta))


# ------------------------------------------------------------------------------------- round directories
@dataclass
class Checkpoint:
    """One checkpoint as read back: the round it starts, its JSON metadata and its tensors."""

    round: int
    meta: dict
    tensors: Tensors
    path: Path


class CheckpointDir:
    """The round checkpoints of one role under `root`; keeps the newest `keep`."""

    def __init__(self, root: Path, role: str, keep: int = 2) -> None:
        self.root, self.role, self.keep = Path(root), role, max(keep, 1)

    def path(self, round: int) -> Path:
        return self.root / f"round-{round:04d}"

    def rounds(self) -> list[int]:
        """Rounds with a complete checkpoint on disk, ascending (temporary and torn directories are skipped)."""
        found = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                match = _ROUND_DIR.match(entry.name)
                if match and (entry / MANIFEST).is_file() and (entry / TENSORS).is_file():
                    found.append(int(match.group(1)))
        return sorted(found)

    def save(self, round: int, tensors: Tensors, meta: dict, fault: Any = None) -> Path:
        """Write the checkpoint of `round` atomically and drop all but the newest `keep`.

        `fault`, if given, is called between the tensor file and the manifest (a testing hook)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-round-{round:04d}-"))
        try:
            data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
            atomic_write_bytes(tmp / TENSORS, data)
            if fault is not None:
                fault()
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "role": self.role, "round": round,
                        "sha256": hashlib.sha256(data).hexdigest(), "meta": _jsonable(meta)}
            manifest["manifest_sha256"] = settings_digest(manifest)  # the manifest's own integrity
            atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            final = self.path(round)
            if final.exists():  # the same round written again after a rollback: swap it out
                aside = Path(tempfile.mkdtemp(dir=self.root, prefix=f".old-round-{round:04d}-"))
                os.replace(final, aside / "old")
                os.replace(tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def prune(self, after: int | None = None) -> None:
        """Drop all but the newest `keep` checkpoints (and, with `after`, every checkpoint of a later round)."""
        rounds = self.rounds()
        doomed = set(rounds[:-self.keep]) | ({r for r in rounds if r > after} if after is not None else set())
        for r in doomed:
            shutil.rmtree(self.path(r), ignore_errors=True)
        for leftover in self.root.glob(".tmp-round-*") if self.root.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)

    def load(self, round: int) -> Checkpoint:
        """Read and verify the checkpoint of `round`."""
        path = self.path(round)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            data = (path / TENSORS).read_bytes()
        except (OSError, ValueError) as err:
            raise CheckpointFormatError(f"checkpoint {path} cannot be read: {err}") from err
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise CheckpointFormatError(f"checkpoint {path} has format {manifest.get('format')!r} version "
                                        f"{manifest.get('version')!r}; this version reads {FORMAT!r} version "
                                        f"{FORMAT_VERSION}")
        if manifest.get("role") != self.role or manifest.get("round") != round:
            raise CheckpointFormatError(f"checkpoint {path} is a {manifest.get('role')} checkpoint of round "
                                        f"{manifest.get('round')}, expected {self.role} round {round}")
        recorded = manifest.pop("manifest_sha256", None) if isinstance(manifest, dict) else None
        if recorded != settings_digest(manifest):
            raise CheckpointFormatError(f"checkpoint {path}: {MANIFEST} does not match its recorded SHA-256 (edited or "
                                        "damaged after it was written); refusing to resume from it")
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            raise CheckpointFormatError(f"checkpoint {path}: {TENSORS} does not match its manifest (corrupt)")
        try:
            tensors = dict(st_load(data))
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise CheckpointFormatError(f"checkpoint {path}: {err}") from err
        return Checkpoint(round, _from_json(manifest["meta"]), tensors, path)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        rounds = self.rounds()
        return self.load(rounds[-1]) if rounds else None


def check_same_run(meta: dict, expected: dict, where: Path) -> None:
    """Refuse a checkpoint written with other settings than this run's (a resume would silently diverge)."""
    diffs = [f"{k}: checkpoint {meta.get(k)!r}, now {v!r}" for k, v in expected.items() if meta.get(k) != v]
    if diffs:
        raise CheckpointFormatError(f"{where} holds a checkpoint of a different run ({'; '.join(diffs)}); "
                                    "resume with the same settings, or use another --output")
