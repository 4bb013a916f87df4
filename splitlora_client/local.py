"""Everything this client reads from its own disk, loaded and checked before it contacts the server: the model
directory's config, the tokenizer and the private training examples. A client that would fail on its own files
fails here, without ever taking one of the server's enrolment slots."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data import Encoded, Example, encode, load_examples, shard, synthetic_e2e
from common.split.parts import load_config
from common.tokenizer import load_tokenizer
from splitlora_client.options import TrainConfig


@dataclass
class LocalData:
    """The client's model directory, tokenizer and examples (not yet tokenized: the length limit is the plan's)."""

    model_dir: Path
    tokenizer: Any
    examples: list[Example]

    def encoded(self, max_len: int) -> list[Encoded]:
        """The examples as token ids and labels, truncated to `max_len` tokens."""
        return [encode(self.tokenizer, ex, max_len) for ex in self.examples]


def load_local(cfg: TrainConfig) -> LocalData:
    """Load and check the model config, tokenizer and data of `cfg`; ValueError naming the file that fails."""
    model_dir = cfg.model_dir()
    config = load_config(model_dir)
    tokenizer = load_tokenizer(cfg.tokenizer or model_dir, getattr(config, "eos_token_id", None))
    if cfg.data:
        examples = shard(load_examples(cfg.data), cfg.shard_index, cfg.shard_count)
        where = f"{cfg.data} (shard {cfg.shard_index} of {cfg.shard_count})" if cfg.shard_count > 1 else cfg.data
    else:
        examples = synthetic_e2e(cfg.builtin_examples, seed=zlib.crc32(cfg.client_id.encode()))
        where = "the built-in data (--builtin-examples)"
    if not examples:
        raise ValueError(f"client {cfg.client_id} has no training examples in {where}")
    return LocalData(model_dir, tokenizer, examples)
