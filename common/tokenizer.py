"""Loading a local tokenizer for training: an end-of-text token to close completions, and a pad token.

Many tokenizers (GPT-2's, Llama 3's) have no pad token: padding then uses the end-of-text token, as the Hugging
Face convention does. Padded positions are masked (attention mask 0, label -100), so they never count. GPT-2's
own files (`tokenizer.json`, `vocab.json`, `merges.txt`, without `tokenizer_config.json`) load without an eos
token: it comes from the model config's `eos_token_id`, else from the tokenizer's one special token.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("splitlora.tokenizer")


class TokenizerError(ValueError):
    """A tokenizer that cannot be used for training; the message says why."""


def _sole_special_token(tokenizer: Any) -> str | None:
    """The tokenizer's only special added token (GPT-2's `<|endoftext|>`), if it has exactly one."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = [t.content for t in decoder.values() if getattr(t, "special", False)]
    return special[0] if len(special) == 1 else None


def load_tokenizer(path: str | Path, eos_token_id: int | None = None) -> Any:
    """The tokenizer in the local directory `path`, with an eos token and a pad token (eos when it has none).

    `eos_token_id`: the model config's, used when the tokenizer files do not name an eos token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"cannot load a tokenizer from {path}: {err}") from err
    if tokenizer.eos_token is None:
        if eos_token_id is not None and 0 <= eos_token_id < len(tokenizer):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_token_id))
        elif (sole := _sole_special_token(tokenizer)) is not None:
            tokenizer.eos_token = sole
        else:
            raise TokenizerError(f"the tokenizer in {path} names no end-of-text (eos) token and the model config "
                                 "has no eos_token_id: add eos_token to its tokenizer_config.json")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.debug("tokenizer %s has no pad token: padding with eos %r (padding is masked)", path,
                  tokenizer.eos_token)
    return tokenizer
