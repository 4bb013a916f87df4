"""Partitions of a training set among clients: IID shards, or non-IID by the attributes of the E2E meaning
representation (a Dirichlet draw per attribute combination, the usual label-skew recipe of federated learning).

The meaning representation comes in two spellings, both understood: E2E's `name : X | food : Y | area : Z` and
`name[X], food[Y], area[Z]` (the built-in synthetic data). Attribute names compare without case and spaces
(`eatType` = `eat type`); an absent attribute counts as its own value.
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Sequence

from common.data import Example, shard

DEFAULT_ATTRIBUTES = ("eatType", "food", "area")
_BRACKETS = re.compile(r"\s*([^,\[\]]+?)\s*\[([^\]]*)\]")


def _norm(name: str) -> str:
    return name.replace(" ", "").lower()


def attributes(context: str | None) -> dict[str, str]:
    """The meaning representation's attributes, by normalised name (empty for plain text)."""
    if not context:
        return {}
    if "[" in context:
        return {_norm(k): v.strip() for k, v in _BRACKETS.findall(context)}
    pairs = (part.split(":", 1) for part in context.split("|") if ":" in part)
    return {_norm(k): v.strip() for k, v in pairs}


def group_key(example: Example, names: Sequence[str] = DEFAULT_ATTRIBUTES) -> tuple[str, ...]:
    """The values of `names` in an example's meaning representation ('-' where absent)."""
    attrs = attributes(example.context)
    return tuple(attrs.get(_norm(n), "-") for n in names)


def _dirichlet(rng: random.Random, alpha: float, n: int) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
    total = sum(draws)
    return [d / total for d in draws] if total > 0 else [1.0 / n] * n


def dirichlet_partition(examples: Sequence[Example], clients: int, alpha: float, seed: int = 0,
                        names: Sequence[str] = DEFAULT_ATTRIBUTES, min_size: int = 1) -> list[list[int]]:
    """Indices of each client's examples: for every attribute combination, proportions ~ Dirichlet(alpha) over
    the clients (small alpha: each combination mostly at one client; large: close to IID). Redrawn (new seeds)
    until every client has `min_size` examples; ValueError if that seems impossible."""
    if clients < 1 or not alpha > 0:
        raise ValueError(f"need clients >= 1 and alpha > 0, got {clients} and {alpha}")
    if len(examples) < clients * min_size:
        raise ValueError(f"{len(examples)} examples cannot give {clients} clients {min_size} each")
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        groups[group_key(example, names)].append(i)
    for attempt in range(100):
        rng = random.Random(seed * 1000 + attempt)
        parts: list[list[int]] = [[] for _ in range(clients)]
        for key in sorted(groups):
            members = list(groups[key])
            rng.shuffle(members)
            bounds, acc = [], 0.0
            for p in _dirichlet(rng, alpha, clients):
                acc += p
                bounds.append(round(acc * len(members)))
            start = 0
            for client, end in enumerate(bounds):
                parts[client].extend(members[start:end])
                start = end
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave every one of {clients} clients {min_size} examples; "
                     "raise alpha or lower the client count")


def partition(examples: Sequence[Example], clients: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
              min_size: int = 1) -> list[list[Example]]:
    """Each client's examples: `iid` (every clients-th line, as `--shard-index`) or `dirichlet`."""
    if scheme == "iid":
        return [shard(examples, i, clients) for i in range(clients)]
    if scheme == "dirichlet":
        return [[examples[i] for i in part]
                for part in dirichlet_partition(examples, clients, alpha, seed, min_size=min_size)]
    raise ValueError(f"partition scheme {scheme!r} is not 'iid' or 'dirichlet'")
