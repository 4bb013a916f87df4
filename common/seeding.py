"""Order-independent randomness: every step draws from a generator seeded by (seed, who, step).

With this, dropout masks do not depend on how the steps of different clients interleave on the server, and a
resumed run needs no saved RNG state to reproduce an uninterrupted one.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from a base seed and any identifying parts (client id, step number...)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_torch(seed: int, *parts: object) -> None:
    """Seed torch's global generator for the step identified by `parts`."""
    torch.manual_seed(derive_seed(seed, *parts))
