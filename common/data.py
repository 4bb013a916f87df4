"""Datasets, tokenization and collation for causal-LM fine-tuning.

Example files hold one example per line, in one of three formats detected per
file from its first non-blank line: E2E ``context||completion`` lines, JSONL
``{"context": ..., "completion": ...}`` or JSONL ``{"text": ...}``.  Examples
are encoded to ``(input_ids, labels)`` pairs (labels unshifted, -100 on the
context) and collated with dynamic right padding.  ``synthetic_e2e`` builds an
offline E2E-style restaurant dataset that the built-in tiny model can learn.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch

from common.atomic import atomic_write_bytes

IGNORE_INDEX = -100
E2E_SEPARATOR = "||"

Encoded = tuple[list[int], list[int]]
T = TypeVar("T")


class DataError(ValueError):
    """A data file is missing or malformed; the message names file and line."""


@dataclass(frozen=True)
class Example:
    """One training example; ``context`` is None for plain text."""

    context: str | None
    completion: str


# --------------------------------------------------------------------- files
def load_examples(path: str | Path) -> list[Example]:
    """Read a data file (E2E lines or JSONL, auto-detected); blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc})") from exc
    lines = [(n, ln.rstrip("\r")) for n, ln in enumerate(text.split("\n"), 1) if ln.strip()]
    if not lines:
        raise DataError(f"{p}: file is empty (no examples)")
    parse = _parse_json_line if _json_object(lines[0][1]) is not None else _parse_e2e_line
    return [parse(p, n, line) for n, line in lines]


def _json_object(line: str) -> dict | None:
    """The line parsed as a JSON object, or None."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _parse_e2e_line(path: Path, lineno: int, line: str) -> Example:
    if E2E_SEPARATOR not in line:
        raise DataError(f"{path}:{lineno}: expected 'context||completion' or a JSON object, "
                        f"got {line[:60]!r}")
    context, completion = (s.strip() for s in line.split(E2E_SEPARATOR, 1))
    if not completion:
        raise DataError(f"{path}:{lineno}: empty completion")
    return Example(context, completion)


def _parse_json_line(path: Path, lineno: int, line: str) -> Example:
    obj = _json_object(line)
    if obj is None:
        raise DataError(f"{path}:{lineno}: expected a JSON object (file is JSONL), "
                        f"got {line[:60]!r}")
    if "completion" in obj and "context" in obj:
        context, completion = obj["context"], obj["completion"]
        if not (context is None or isinstance(context, str)):
            raise DataError(f"{path}:{lineno}: 'context' must be a string or null")
    elif "text" in obj:
        context, completion = None, obj["text"]
    else:
        raise DataError(f"{path}:{lineno}: JSON object needs 'context' and 'completion' keys "
                        f"or a 'text' key, found keys {sorted(obj)}")
    if not isinstance(completion, str) or not completion.strip():
        raise DataError(f"{path}:{lineno}: completion/text must be a non-empty string")
    return Example(context, completion)


def write_examples(path: str | Path, examples: Sequence[Example]) -> None:
    """Atomically write examples as E2E ``context||completion`` lines."""
    lines = []
    for i, ex in enumerate(examples):
        if ex.context is None or E2E_SEPARATOR in ex.context or "\n" in ex.context + ex.completion:
            raise ValueError(f"example {i} cannot be written as an E2E line: {ex!r}")
        lines.append(f"{ex.context}{E2E_SEPARATOR}{ex.completion}\n")
    atomic_write_bytes(Path(path), "".join(lines).encode("utf-8"))


def shard(examples: Sequence[T], index: int, count: int) -> list[T]:
    """Every ``count``-th example starting at ``index`` (no shuffling)."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}), got {index}")
    return list(examples[index::count])


# ------------------------------------------------------------------ encoding
def encode(tokenizer: Any, example: Example, max_len: int) -> Encoded:
    """Token ids and unshifted labels (-100 over the context), truncated to ``max_len``.

    Context and completion are tokenized separately; the completion gets a
    leading space (unless it already starts with whitespace) and an eos token.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id")
    if example.context is None:
        ids = _tokenize(tokenizer, example.completion) + [eos]
        labels = list(ids)
    else:
        completion = example.completion
        if not completion[:1].isspace():
            completion = " " + completion
        context_ids = _tokenize(tokenizer, example.context)
        completion_ids = _tokenize(tokenizer, completion) + [eos]
        ids = context_ids + completion_ids
        labels = [IGNORE_INDEX] * len(context_ids) + completion_ids
    return ids[:max_len], labels[:max_len]


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; int64 input_ids/attention_mask/labels/position_ids.

    Padding gets ``pad_id``, mask 0 and label -100; its position id is whatever
    ``(mask.cumsum(-1) - 1).clamp(min=0)`` gives (masked, so irrelevant).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ids) for ids, _ in batch)
    shape = (len(batch), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        if len(ids) != len(labs):
            raise ValueError(f"batch item {row}: {len(ids)} ids but {len(labs)} labels")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(ids)] = torch.tensor(labs, dtype=torch.long)
        mask[row, : len(ids)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "position_ids": position_ids}


class BatchStream:
    """Infinite, deterministic, resumable stream of collated batches.

    Each epoch visits every example once in an order drawn from a
    ``torch.Generator`` seeded from ``(seed, epoch)``.  Batches never span
    epochs: the last batch of an epoch holds the remainder, so when there are
    fewer examples than ``batch_size`` every batch is the whole (reshuffled)
    dataset.
    """

    def __init__(self, encoded: Sequence[Encoded], batch_size: int, pad_id: int, seed: int = 0):
        if not encoded:
            raise ValueError("BatchStream needs at least one encoded example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoded = list(encoded)
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.epoch = self.position = self.samples_seen = 0
        self._cached: tuple[int, list[int]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.encoded) // self.batch_size)

    def _order(self) -> list[int]:
        if self._cached is None or self._cached[0] != self.epoch:
            digest = hashlib.sha256(f"{self.seed}:{self.epoch}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            self._cached = (self.epoch, torch.randperm(len(self.encoded), generator=gen).tolist())
        return self._cached[1]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next collated batch (advancing epoch/position/samples_seen)."""
        indices = self._order()[self.position : self.position + self.batch_size]
        self.position += len(indices)
        self.samples_seen += len(indices)
        if self.position >= len(self.encoded):
            self.epoch, self.position = self.epoch + 1, 0
        return collate([self.encoded[i] for i in indices], self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position,
                "samples_seen": self.samples_seen, "num_examples": len(self.encoded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()`` output (same data, batch size and seed)."""
        epoch, position = int(state["epoch"]), int(state["position"])
        n = int(state.get("num_examples", len(self.encoded)))
        if n != len(self.encoded):
            raise ValueError(f"state is for {n} examples, stream has {len(self.encoded)}")
        if epoch < 0 or not 0 <= position < n:
            raise ValueError(f"invalid stream state epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
        self.samples_seen = int(state.get("samples_seen", 0))


# ------------------------------------------------------------ synthetic E2E
_NAMES = ("The Golden Palace", "Cafe Rouge", "The Eagle", "Green Man", "Blue Spice",
          "The Punter", "Aromi", "Zizzi", "Loch Fyne", "The Mill", "Wildwood",
          "Fitzbillies", "The Phoenix", "Alimentum", "Browns Cambridge", "Clowns",
          "Cotto", "Giraffe", "Strada", "The Waterman")
# attribute -> {context value: phrase used in completions}
_PHRASES: dict[str, dict[str, str]] = {
    "eatType": {"coffee shop": "coffee shop", "restaurant": "restaurant", "pub": "pub"},
    "food": {f: f for f in ("French", "Italian", "Chinese", "Indian", "Japanese",
                            "English", "Spanish", "Thai")},
    "priceRange": {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive"},
    "customer rating": {"low": "a low customer rating", "average": "an average customer rating",
                        "high": "a high customer rating",
                        **{f"{k} out of 5": f"a customer rating of {k} out of 5"
                           for k in (1, 3, 5)}},
    "area": {"riverside": "by the riverside", "city centre": "in the city centre"},
    "familyFriendly": {"yes": "family friendly", "no": "not family friendly"},
}
_KEYS = {"eatType": "eat", "food": "food", "priceRange": "price", "customer rating": "rating",
         "area": "area", "familyFriendly": "family", "near": "near"}
_ORDER = ("eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
_KIDS = {"yes": "Children are welcome", "no": "It is not suitable for children"}
# A template is a sequence of segments; a segment is a tuple of alternatives and
# the first alternative whose {keys} are all known is used ("" = skip).
_TEMPLATES: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("{name} is a",), (" {price}", ""), (" {food}", ""), (" {eat}",),
     (" {area}", ""), (" near {near}", ""), (".",),
     (" It has {rating} and is {family}.", " It has {rating}.", " It is {family}.", "")),
    (("There is a",), (" {price}", ""), (" {eat} called {name}",), (" {area}", ""),
     (" near {near}", ""), (" that serves {food} food", ""), (".",),
     (" It is {family} and has {rating}.", " It is {family}.", " It has {rating}.", "")),
    (("Located {area} near {near},", "Located {area},", "Located near {near},", ""),
     (" {name} is a",), (" {price}", ""), (" {eat}",), (" serving {food} food", ""),
     (" with {rating}", ""), (".",), (" {kids}.", "")),
)
_WORD_RE = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
_SLOT_RE = re.compile(r"\{(\w+)\}")


def _pick(rng: random.Random) -> dict[str, str]:
    """A random attribute subset (``name`` always present), in E2E order."""
    attrs = {"name": rng.choice(_NAMES)}
    for key in _ORDER:
        if rng.random() < 0.6:
            pool = _NAMES if key == "near" else tuple(_PHRASES[key])
            attrs[key] = rng.choice([v for v in pool if v != attrs["name"]])
    return attrs


def _render(attrs: dict[str, str], template: int) -> str:
    """The completion: a deterministic function of attributes and template index."""
    slots = {"name": attrs["name"], "eat": "place"}
    for key, value in attrs.items():
        if key in _KEYS:
            slots[_KEYS[key]] = _PHRASES.get(key, {}).get(value, value)
    if "familyFriendly" in attrs:
        slots["kids"] = _KIDS[attrs["familyFriendly"]]
    parts = [next(alt for alt in seg if set(_SLOT_RE.findall(alt)) <= slots.keys())
             for seg in _TEMPLATES[template]]
    text = "".join(parts).strip().format(**slots)
    return re.sub(r"\ba (?=[AEIOUaeiou])", "an ", text)


def synthetic_e2e(n: int, seed: int) -> list[Example]:
    """``n`` E2E-style table-to-text examples drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        attrs = _pick(rng)
        context = ", ".join(f"{k}[{v}]" for k, v in attrs.items())
        out.append(Example(context, _render(attrs, rng.randrange(len(_TEMPLATES)))))
    return out


def synthetic_corpus_words() -> list[str]:
    """Sorted list of every word/punctuation token ``synthetic_e2e`` can emit."""
    texts = ["name [ ] , . a an place", *_NAMES, *_KEYS, *_KIDS.values()]
    for table in _PHRASES.values():
        texts += [*table, *table.values()]
    texts += [_SLOT_RE.sub(" ", alt) for tpl in _TEMPLATES for seg in tpl for alt in seg]
    return sorted({w for t in texts for w in _WORD_RE.findall(t)})
