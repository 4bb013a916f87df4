"""Tests for common.builtin: the offline tiny GPT-2 model and word-level tokenizer."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from common import builtin
from common.builtin import (
    BUILTIN_MODEL_NAME, DEFAULT_TINY_CONFIG, build_tiny_model, builtin_home, builtin_vocab,
    ensure_builtin_model,
)
from common.data import Example, encode, synthetic_corpus_words


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return ensure_builtin_model(tmp_path_factory.mktemp("home"))


def _leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "builtin").iterdir())


def test_builtin_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITLORA_HOME", str(tmp_path))
    assert builtin_home() == tmp_path
    monkeypatch.delenv("SPLITLORA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert builtin_home() == tmp_path / "user" / ".cache" / "splitlora"


def test_layout_and_reuse(model_dir):
    assert model_dir.name == BUILTIN_MODEL_NAME and model_dir.parent.name == "builtin"
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin_model(model_dir.parent.parent) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
    assert _leftovers(model_dir.parent.parent) == [BUILTIN_MODEL_NAME]


def test_env_var_home(monkeypatch, tmp_path, model_dir):
    monkeypatch.setenv("SPLITLORA_HOME", str(tmp_path))
    path = ensure_builtin_model()
    assert path == tmp_path / "builtin" / BUILTIN_MODEL_NAME
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (path / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_auto_classes_load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 0, 0, 1)
    assert tok.eos_token == "<|endoftext|>" and len(tok) == len(builtin_vocab())
    assert tok.get_vocab() == builtin_vocab()
    assert tok.tokenize("name[The Eagle], near.") == [
        "name", "[", "The", "Eagle", "]", ",", "near", "."]
    text = "The Eagle is a cheap pub by the riverside. It has a high customer rating."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "gpt2" and cfg.vocab_size % 8 == 0
    assert len(tok) <= cfg.vocab_size < len(tok) + 8
    assert {k: getattr(cfg, k) for k in DEFAULT_TINY_CONFIG} == DEFAULT_TINY_CONFIG
    ids, labels = encode(tok, Example("name[Aromi]", "Aromi is a pub."), 128)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    assert out.logits.shape == (1, len(ids), cfg.vocab_size)
    assert abs(out.loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 1.0


def test_deterministic_bytes(tmp_path, model_dir):
    other = ensure_builtin_model(tmp_path)
    assert other != model_dir
    for name in sorted(p.name for p in model_dir.iterdir()):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(40, n_layer=1)
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_model(40, n_layer=1)
    assert a.config.vocab_size == 40 and a.config.n_layer == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_concurrent_callers_agree(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ensure_builtin_model(tmp_path), range(4)))
    assert len(set(paths)) == 1 and _leftovers(tmp_path) == [BUILTIN_MODEL_NAME]


def test_lost_race_uses_winner(tmp_path, monkeypatch):
    real = builtin.write_builtin_model
    target = tmp_path / "builtin" / BUILTIN_MODEL_NAME

    def racing(directory: Path) -> None:
        real(directory)
        rival = tmp_path / "builtin" / ".rival"
        rival.mkdir()
        real(rival)
        (rival / "winner.txt").write_text("rival")
        os.rename(rival, target)

    monkeypatch.setattr(builtin, "write_builtin_model", racing)
    assert ensure_builtin_model(tmp_path) == target
    assert (target / "winner.txt").read_text() == "rival"
    assert _leftovers(tmp_path) == [BUILTIN_MODEL_NAME]


def test_stale_or_broken_dir_is_reported(tmp_path, model_dir):
    broken = tmp_path / "builtin" / BUILTIN_MODEL_NAME
    broken.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="incomplete"):
        ensure_builtin_model(tmp_path)
    other = ensure_builtin_model(tmp_path / "h2")
    (other / builtin.MARKER_FILE).write_text(json.dumps({"fingerprint": "old"}))
    with pytest.raises(RuntimeError, match="different SplitLoRA version"):
        ensure_builtin_model(tmp_path / "h2")


def test_vocab_is_sorted_words_after_specials():
    vocab = builtin_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert tokens[:2] == ["<|endoftext|>", "<unk>"]
    assert tokens[2:] == sorted(synthetic_corpus_words())
