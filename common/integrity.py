"""Integrity of files that are read back: a SHA-256 digest written next to each one, checked on every read.

`<file>.sha256` holds `<hex digest>  <file name>` (the `sha256sum` format, so `sha256sum -c` checks it too). It
is written after the file (both atomically) and removed before the file is rewritten, so a process killed in
between leaves a file without a digest, which readers treat as never written (`missing_ok`), never a file with a
wrong one. A digest that does not match is a refusal naming the file: damaged or edited state is never resumed
or served silently. JSON settings are covered the same way with `settings_digest`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.atomic import atomic_write_bytes

SUFFIX = ".sha256"


class IntegrityError(ValueError):
    """A file does not match the digest recorded when it was written; the message names it."""


def digest_path(path: Path) -> Path:
    """Where the digest of `path` is kept."""
    return path.with_name(path.name + SUFFIX)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def settings_digest(settings: object) -> str:
    """The digest of JSON-able settings (key order does not matter)."""
    return sha256_hex(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())


def write_with_digest(path: Path, data: bytes) -> None:
    """Write `data` to `path` and its digest next to it, both atomically."""
    path = Path(path)
    digest_path(path).unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    atomic_write_bytes(digest_path(path), f"{sha256_hex(data)}  {path.name}\n".encode())


def recorded_digest(path: Path) -> str | None:
    """The digest recorded for `path`, or None when there is none."""
    try:
        text = digest_path(Path(path)).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0] if text else ""


def read_verified(path: Path, missing_ok: bool = False) -> bytes | None:
    """The bytes of `path` after checking them against their digest. Without a digest: None with `missing_ok`
    (written by a process killed before it finished), else IntegrityError."""
    path = Path(path)
    expected = recorded_digest(path)
    if expected is None:
        if missing_ok:
            return None
        raise IntegrityError(f"{path} has no digest ({digest_path(path).name}): it was not written completely by "
                             "SplitLoRA; refusing to use it")
    data = path.read_bytes()
    if sha256_hex(data) != expected:
        raise IntegrityError(f"{path} does not match its recorded SHA-256 ({digest_path(path).name}): the file was "
                             "damaged or edited after it was written; refusing to use it (restore it or delete it)")
    return data


def drop(path: Path) -> None:
    """Delete a file and its digest."""
    digest_path(Path(path)).unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)
