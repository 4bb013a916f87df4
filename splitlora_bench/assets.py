"""What every benchmark trains on: a GPT-2-shaped model (built here and briefly pretrained: there is no model hub
to fetch GPT-2's weights from) with GPT-2's real tokenizer, and the E2E examples, all taken by path and never
copied into the repository."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from splitlora_bench.options import BenchConfig
from splitlora_bench.pretrain import pretrain, pretraining_corpus
from common.data import Encoded, Example, encode, load_examples, write_examples
from common.tokenizer import load_tokenizer

MARKER = "splitlora_bench_model.json"


def model_dir(cfg: BenchConfig, shape: tuple[int, int] | None = None) -> Path:
    """`--model`, or a GPT-2-shaped model built once under OUT/models: without `shape`, the model every benchmark
    trains (--n-layer x --n-embd, pretrained for --pretrain-steps); with one, a random-init model of that shape
    (layers, width), used only for timing and counting."""
    if cfg.model:
        return Path(cfg.model)
    layers, width = shape or (cfg.n_layer, cfg.n_embd)
    steps = 0 if shape else cfg.pretrain_steps
    heads = cfg.n_head if width == cfg.n_embd else max(1, width // 64)
    name = f"gpt2-random-{layers}x{width}-e{cfg.embedding_std:g}-s{cfg.seed}"
    if steps:  # the name says what the base learned from, so a changed data selection builds a new one
        corpus = hashlib.sha256("\n".join([str(Path(cfg.pretrain_data).resolve()), cfg.train_data, cfg.eval_data,
                                           str(cfg.eval_examples)]).encode()).hexdigest()[:8]
        name += f"-pre{steps}x{cfg.pretrain_batch}-lr{cfg.pretrain_learning_rate:g}-{corpus}"
    target = cfg.out_dir / "models" / name
    if not (target / MARKER).is_file():
        _build(cfg, target, layers, width, heads, steps)
    return target


def _build(cfg: BenchConfig, target: Path, layers: int, width: int, heads: int, pretrain_steps: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(cfg.tokenizer)  # GPT-2's own files: eos from its one special token, pad = eos
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(cfg.max_seq_len, 256), n_embd=width,
                        n_layer=layers, n_head=heads, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    info: dict[str, Any] = {"init": "random", "seed": cfg.seed, "shape": f"{layers}x{width}",
                            "embedding_std": cfg.embedding_std, "tokenizer": cfg.tokenizer}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():
            model.transformer.wte.weight.normal_(0.0, cfg.embedding_std)  # tied: the LM head too
        if pretrain_steps:
            pool = load_examples(cfg.pretrain_data)
            _, held_out = examples(cfg)
            corpus = pretraining_corpus(tokenizer, pool, held_out, cfg.max_seq_len)
            losses = pretrain(model, corpus, tokenizer.pad_token_id, pretrain_steps, cfg.pretrain_batch,
                              cfg.pretrain_learning_rate, cfg.seed)
            info["pretraining"] = {"steps": pretrain_steps, "batch": cfg.pretrain_batch, "lines": len(corpus),
                                   "learning_rate": cfg.pretrain_learning_rate,
                                   "data": cfg.pretrain_data,
                                   "first_loss": losses[0], "last10_loss": sum(losses[-10:]) / len(losses[-10:])}
    partial = target.with_name(target.name + ".partial")
    for leftover in (partial, target):  # an interrupted build's, without its marker
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer.save_pretrained(partial)
    model.save_pretrained(partial, safe_serialization=True)
    (partial / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    partial.replace(target)


def tokenizer_of(model: Path) -> Any:
    """The tokenizer saved with the model, as the client loads it (pad = eos when it has none)."""
    return load_tokenizer(model)


def examples(cfg: BenchConfig) -> tuple[list[Example], list[Example]]:
    """(fine-tuning examples, held-out examples): the held-out ones are the first --eval-examples of --eval-data,
    or of --train-data when no --eval-data is given; no fine-tuning example shares a held-out example's context
    (E2E has several references per meaning representation)."""
    train = load_examples(cfg.train_data)
    held_out = (load_examples(cfg.eval_data) if cfg.eval_data else train)[:cfg.eval_examples]
    contexts = {ex.context for ex in held_out}
    return [ex for ex in train if ex.context not in contexts], held_out


_WRITTEN: dict[tuple[str, ...], Path] = {}  # train files this process has written, by what they hold


def train_file(cfg: BenchConfig) -> Path:
    """The fine-tuning examples as a file for client processes (OUT/data/train.txt, derived, never committed);
    written once per process and data selection, however many client processes read it."""
    key = (str(cfg.out_dir.resolve()), cfg.train_data, cfg.eval_data, str(cfg.eval_examples))
    if key not in _WRITTEN:
        path = cfg.out_dir / "data" / "train.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_examples(path, examples(cfg)[0])
        _WRITTEN[key] = path.resolve()
    return _WRITTEN[key]


def encoded(tokenizer: Any, items: list[Example], max_len: int) -> list[Encoded]:
    """Token ids and labels of examples."""
    return [encode(tokenizer, ex, max_len) for ex in items]
