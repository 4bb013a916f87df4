"""The built-in tiny GPT-2 model and word-level tokenizer, so demos run offline.

``ensure_builtin_model()`` returns ``<home>/builtin/tiny-gpt2-v1``, creating it on
first use.  Creation is deterministic (same bytes every time) and race-safe:
each process builds in a private temp dir beside the target and renames it into
place; a loser of the race discards its copy and uses the winner's.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from common.data import synthetic_corpus_words

BUILTIN_MODEL_NAME = "tiny-gpt2-v1"
EOS_TOKEN = "<|endoftext|>"  # also bos and pad, id 0
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (EOS_TOKEN, UNK_TOKEN)
MARKER_FILE = "splitlora_builtin.json"
INIT_SEED = 0

TINY_N_POSITIONS = 128
TINY_N_EMBD = 128
TINY_N_LAYER = 6
TINY_N_HEAD = 4
VOCAB_MULTIPLE = 8
DEFAULT_TINY_CONFIG: dict[str, int] = {
    "n_positions": TINY_N_POSITIONS, "n_embd": TINY_N_EMBD,
    "n_layer": TINY_N_LAYER, "n_head": TINY_N_HEAD,
}
_BUILD_LOCK = threading.Lock()  # torch's global RNG is shared by threads
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", MARKER_FILE)


def builtin_home() -> Path:
    """``$SPLITLORA_HOME`` if set, else ``~/.cache/splitlora``."""
    env = os.environ.get("SPLITLORA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitlora"


def builtin_vocab() -> dict[str, int]:
    """Specials first (eos id 0, unk id 1), then the sorted synthetic corpus words."""
    words = [w for w in sorted(set(synthetic_corpus_words())) if w not in SPECIAL_TOKENS]
    return {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def build_builtin_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over the word-level builtin vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(builtin_vocab(), unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    # WordPiece decoding joins words with spaces and removes the space before . , ! ?
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN, model_max_length=TINY_N_POSITIONS)


def tiny_gpt2_config(vocab_size: int, **overrides: Any) -> Any:
    """A ``GPT2Config`` with the tiny defaults (vocab rounded up to a multiple of 8)."""
    from transformers import GPT2Config

    kwargs: dict[str, Any] = {**DEFAULT_TINY_CONFIG, "bos_token_id": 0, "eos_token_id": 0,
                              "pad_token_id": 0, **overrides}
    return GPT2Config(vocab_size=round_up(vocab_size), **kwargs)


def build_tiny_model(vocab_size: int, seed: int = INIT_SEED, **overrides: Any) -> Any:
    """A freshly initialised tiny ``GPT2LMHeadModel``, deterministic for a given seed.

    The caller's global torch RNG state is left untouched.
    """
    import torch
    from transformers import GPT2LMHeadModel

    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(tiny_gpt2_config(vocab_size, **overrides)).eval()


def _fingerprint() -> str:
    """Identifies the vocabulary and architecture this code would build."""
    blob = json.dumps([BUILTIN_MODEL_NAME, builtin_vocab(), DEFAULT_TINY_CONFIG, INIT_SEED])
    return hashlib.sha256(blob.encode()).hexdigest()


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' progress bars while saving, restoring the setting after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def write_builtin_model(directory: Path) -> None:
    """Write tokenizer, model (safetensors) and marker file into ``directory``."""
    tokenizer = build_builtin_tokenizer()
    model = build_tiny_model(len(tokenizer))
    with _quiet_progress():
        tokenizer.save_pretrained(directory)
        model.save_pretrained(directory, safe_serialization=True)
    # transformers 5 records "TokenizersBackend"; the old name loads in 4.x and 5.x.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    marker = {"name": BUILTIN_MODEL_NAME, "fingerprint": _fingerprint()}
    (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _check_existing(target: Path) -> Path:
    missing = [f for f in _REQUIRED_FILES if not (target / f).is_file()]
    if missing:
        raise RuntimeError(f"built-in model dir {target} is incomplete (missing {missing}); "
                           "delete it to rebuild")
    marker = json.loads((target / MARKER_FILE).read_text(encoding="utf-8"))
    if marker.get("fingerprint") != _fingerprint():
        raise RuntimeError(f"built-in model at {target} was built by a different SplitLoRA "
                           "version (vocabulary or config differ); delete it to rebuild")
    return target


def ensure_builtin_model(home: Path | None = None) -> Path:
    """Return ``<home>/builtin/tiny-gpt2-v1``, building it atomically if missing."""
    root = Path(home).expanduser() if home is not None else builtin_home()
    target = root / "builtin" / BUILTIN_MODEL_NAME
    if target.exists():
        return _check_existing(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{BUILTIN_MODEL_NAME}.tmp-"))
    try:
        write_builtin_model(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, target)
    except OSError:
        if not target.exists():  # a real failure, not a lost race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _check_existing(target)
