"""What every benchmark trains on: a GPT-2-shaped model (random init: there is no model hub here) with GPT-2's
real tokenizer, and the E2E examples, all taken by path and never copied into the repository."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.config import BenchConfig
from common.data import Encoded, Example, encode, load_examples

MARKER = "splitlora_bench_model.json"


def model_dir(cfg: BenchConfig, shape: tuple[int, int] | None = None) -> Path:
    """`--model`, or a random-init GPT-2 of the given (layers, width) built once under OUT/models."""
    if cfg.model:
        return Path(cfg.model)
    layers, width = shape or (cfg.n_layer, cfg.n_embd)
    heads = cfg.n_head if width == cfg.n_embd else max(1, width // 64)
    target = cfg.out_dir / "models" / f"gpt2-random-{layers}x{width}-e{cfg.embedding_std:g}-s{cfg.seed}"
    if not (target / MARKER).is_file():
        _build(target, Path(cfg.tokenizer), layers, width, heads, max(cfg.max_seq_len, 256), cfg.seed,
               cfg.embedding_std)
    return target


def _build(target: Path, tokenizer_dir: Path, layers: int, width: int, heads: int, positions: int, seed: int,
           embedding_std: float) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; padding is masked anyway
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():
            model.transformer.wte.weight.normal_(0.0, embedding_std)  # tied: the LM head too
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(target)
    model.save_pretrained(target, safe_serialization=True)
    (target / MARKER).write_text(json.dumps({"init": "random", "seed": seed, "shape": f"{layers}x{width}",
                                             "embedding_std": embedding_std, "tokenizer": str(tokenizer_dir)},
                                            indent=2) + "\n")


def tokenizer_of(model: Path) -> Any:
    """The tokenizer saved with the model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model), local_files_only=True)


def examples(cfg: BenchConfig) -> tuple[list[Example], list[Example]]:
    """(training examples, the first --eval-examples held-out examples)."""
    return load_examples(cfg.train_data), load_examples(cfg.eval_data)[:cfg.eval_examples]


def encoded(tokenizer: Any, items: list[Example], max_len: int) -> list[Encoded]:
    """Token ids and labels of examples."""
    return [encode(tokenizer, ex, max_len) for ex in items]
