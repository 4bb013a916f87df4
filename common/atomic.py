"""Crash-safe file writes for the whole tree: write a temporary file, flush, fsync, rename, fsync the directory.

A process killed at any instant leaves either the previous file or the new one, never a torn one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

Tensors = dict[str, torch.Tensor]


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a temporary file in the same directory: write, flush, fsync, rename; the file
    gets permissions `mode`. The one crash-safe file write of the tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
