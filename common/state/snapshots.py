"""Training-state snapshots: versioned round directories written atomically, optimizer state never pickled.

A checkpoint is a directory `round-NNNN/` (the state from which round NNNN starts) holding `state.safetensors`
(every tensor) and `manifest.json` (format version, role, round, the tensor file's sha256 and JSON metadata).
It is built in a temporary directory, every file flushed and fsynced, and renamed into place in one step, so a
process killed at any instant leaves either the previous checkpoint or the new one, never a torn one.
Optimizer and scheduler states are split into tensors (safetensors) and plain values (JSON); nothing is pickled.
(`common/weights.py` is something else: it reads model weights.)
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

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.atomic import Tensors, atomic_write_bytes, fsync_dir
from common.state import CheckpointFormatError
from common.state.optimizer import from_json, to_json

FORMAT = "splitlora-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "state.safetensors"
_ROUND_DIR = re.compile(r"^round-(\d{4,})$")


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
                        "sha256": hashlib.sha256(data).hexdigest(), "meta": to_json(meta)}
            atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            final = self.path(round)
            if final.exists():  # the same round written again after a rollback: swap it out
                aside = Path(tempfile.mkdtemp(dir=self.root, prefix=f".old-round-{round:04d}-"))
                os.replace(final, aside / "old")
                os.replace(tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.root)
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
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            raise CheckpointFormatError(f"checkpoint {path}: {TENSORS} does not match its manifest (corrupt)")
        try:
            tensors = dict(st_load(data))
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise CheckpointFormatError(f"checkpoint {path}: {err}") from err
        return Checkpoint(round, from_json(manifest["meta"]), tensors, path)

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
