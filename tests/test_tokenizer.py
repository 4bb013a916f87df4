"""Tokenizers without a pad token (GPT-2's own files): padding uses eos, masked, and never counts as a label."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


from common.data import IGNORE_INDEX, BatchStream, Example, encode
from common.tokenizer import TokenizerError, load_tokenizer

GPT2_EOS = 50256


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    path = Path("/work/shared/data/gpt2-tokenizer")
    if not path.is_dir():
        pytest.skip("GPT-2's tokenizer files are not beside the project")
    return path


def test_gpt2_files_get_eos_and_pad(gpt2_dir: Path) -> None:
    tokenizer = load_tokenizer(gpt2_dir)  # no tokenizer_config.json: eos is the one special token
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|endoftext|>", GPT2_EOS,
                                                                                       GPT2_EOS)
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [15496, 995]  # GPT-2's real ids
    assert load_tokenizer(gpt2_dir, eos_token_id=GPT2_EOS).eos_token_id == GPT2_EOS


def test_padding_with_eos_is_masked_and_the_real_eos_counts(gpt2_dir: Path) -> None:
    tokenizer = load_tokenizer(gpt2_dir)
    short = encode(tokenizer, Example("name[Aromi]", "Aromi."), 64)
    long = encode(tokenizer, Example("name[The Eagle], food[French], area[riverside]",
                                     "The Eagle serves French food by the river."), 64)
    batch = BatchStream([short, long], 2, tokenizer.pad_token_id, seed=0).next_batch()
    row = [i for i in range(2) if int(batch["attention_mask"][i].sum()) == len(short[0])][0]
    n = len(short[0])
    assert batch["input_ids"][row, n:].eq(GPT2_EOS).all() and batch["input_ids"].shape[1] > n
    assert batch["attention_mask"][row, n:].eq(0).all() and batch["labels"][row, n:].eq(IGNORE_INDEX).all()
    assert batch["labels"][row, n - 1].item() == GPT2_EOS  # the completion's own eos is a target
    counted = batch["labels"].ne(IGNORE_INDEX).sum().item()
    assert counted == sum(sum(1 for x in labels if x != IGNORE_INDEX) for _, labels in (short, long))


def test_a_tokenizer_without_any_eos_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(TokenizerError, match="names no end-of-text"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, eos_token_id=1).pad_token == "b"
