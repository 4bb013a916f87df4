"""Tests for common.data: loading, sharding, encoding, collation, streams, synthetic data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from common.builtin import build_builtin_tokenizer, builtin_vocab
from common.data import (
    IGNORE_INDEX, BatchStream, DataError, Example, collate, encode, load_examples, shard,
    synthetic_corpus_words, synthetic_e2e, write_examples,
)

REAL_E2E = Path("/work/shared/data/e2e/valid.txt")


@pytest.fixture(scope="module")
def tok():
    return build_builtin_tokenizer()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ loading
def test_load_e2e_lines(tmp_path):
    p = _write(tmp_path / "d.txt", "name[A], food[Thai]||A serves Thai food. \n\n  \nk||v||w\n")
    assert load_examples(p) == [Example("name[A], food[Thai]", "A serves Thai food."),
                                Example("k", "v||w")]


def test_load_jsonl_context_completion(tmp_path):
    rows = [{"context": "c1", "completion": "x y"}, {"context": None, "completion": "z"}]
    p = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_examples(str(p)) == [Example("c1", "x y"), Example(None, "z")]


def test_load_jsonl_text(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"text": "hello world"}\n{"text": "bye"}')
    assert load_examples(p) == [Example(None, "hello world"), Example(None, "bye")]


@pytest.mark.skipif(not REAL_E2E.is_file(), reason="shared E2E data not present")
def test_load_real_e2e_valid():
    examples = load_examples(REAL_E2E)
    assert len(examples) == 4672
    assert examples[0].context == "name : Alimentum | area : city centre | family friendly : no"
    assert examples[0].completion.startswith("There is a place in the city centre")
    assert all(ex.context and ex.completion for ex in examples)


@pytest.mark.parametrize("content, pattern", [
    ("a||b\n\nno separator here\n", r":3: expected 'context\|\|completion'"),
    ('{"context": "c", "completion": "d"}\n{"prompt": "x"}\n', r":2: JSON object needs"),
    ('{"text": "a"}\nnot json\n', r":2: expected a JSON object"),
    ('{"text": "a"}\n{"text": 5}\n', r":2: completion/text must be a non-empty string"),
    ("c||   \n", r":1: empty completion"),
])
def test_load_errors_name_file_and_line(tmp_path, content, pattern):
    p = _write(tmp_path / "bad.txt", content)
    with pytest.raises(DataError, match=re.escape(str(p)) + pattern):
        load_examples(p)


def test_load_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"empty\.txt: file is empty"):
        load_examples(_write(tmp_path / "empty.txt", "\n  \n"))
    assert issubclass(DataError, ValueError)


def test_write_examples_round_trip(tmp_path):
    examples = synthetic_e2e(50, seed=3)
    out = tmp_path / "sub" / "train.txt"
    write_examples(out, examples)
    assert load_examples(out) == examples
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.txt"]  # no temp leftovers
    assert out.read_text().splitlines()[0] == f"{examples[0].context}||{examples[0].completion}"
    with pytest.raises(ValueError, match="example 1"):
        write_examples(out, [Example("a", "b"), Example(None, "plain")])
    assert load_examples(out) == examples  # failed write left the old file intact


# ----------------------------------------------------------------- sharding
@pytest.mark.parametrize("n, count", [(10, 3), (7, 7), (2, 5), (0, 2), (100, 1)])
def test_shard_partitions_exactly_once(n, count):
    items = list(range(n))
    shards = [shard(items, i, count) for i in range(count)]
    assert sorted(x for s in shards for x in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    if n >= count:
        assert shards[1 % count][0] == 1 % count


def test_shard_values_and_errors():
    assert shard(list("abcdefg"), 1, 3) == ["b", "e"]
    for index, count in [(3, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError, match="shard"):
            shard([1, 2], index, count)


# ----------------------------------------------------------------- encoding
def test_encode_masks_context_with_concrete_ids(tok):
    ids, labels = encode(tok, Example("name[Aromi], eatType[pub]", "Aromi is a pub."), 64)
    # name [ Aromi ] , eatType [ pub ] | Aromi is a pub . <eos>
    assert ids == [76, 46, 8, 47, 2, 62, 46, 85, 47, 8, 72, 48, 85, 3, 0]
    assert labels == [IGNORE_INDEX] * 9 + [8, 72, 48, 85, 3, 0]
    assert tok.decode(ids[9:], skip_special_tokens=True) == "Aromi is a pub."


def test_encode_plain_text_and_truncation(tok):
    ids, labels = encode(tok, Example(None, "The Eagle is cheap."), 64)
    assert ids == labels == [41, 17, 72, 57, 3, 0]
    assert encode(tok, Example(None, "The Eagle is cheap."), 3) == ([41, 17, 72], [41, 17, 72])
    ids, labels = encode(tok, Example("name[Aromi]", "Aromi is a pub."), 6)
    assert ids == [76, 46, 8, 47, 8, 72] and labels == [-100] * 4 + [8, 72]
    with pytest.raises(ValueError, match="max_len"):
        encode(tok, Example(None, "x"), 0)


class _RecordingTokenizer:
    """Character-level fake that records the texts it was asked to encode."""

    eos_token_id = 999

    def __init__(self):
        self.seen: list[str] = []

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        self.seen.append(text)
        return [ord(c) for c in text]


def test_encode_tokenizes_separately_with_leading_space():
    fake = _RecordingTokenizer()
    ids, labels = encode(fake, Example("ab", "cd"), 100)
    assert fake.seen == ["ab", " cd"]
    assert ids == [97, 98, 32, 99, 100, 999] and labels == [-100, -100, 32, 99, 100, 999]
    encode(fake, Example("ab", " cd"), 100)
    assert fake.seen[-1] == " cd"  # no double space


# ---------------------------------------------------------------- collation
def test_collate_pads_dynamically():
    batch = [([5, 6, 7], [-100, 6, 7]), ([8], [8]), ([9, 10], [9, 10])]
    out = collate(batch, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (3, 3) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [9, 10, -100]]
    # (mask.cumsum - 1).clamp(0): padding repeats the last real position (it is masked anyway)
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0], [0, 1, 1]]
    assert collate([([1, 2], [1, 2])], pad_id=7)["input_ids"].shape == (1, 2)


def test_collate_errors():
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)
    with pytest.raises(ValueError, match="labels"):
        collate([([1, 2], [1])], 0)


# ------------------------------------------------------------------ streams
def _encoded(n: int) -> list[tuple[list[int], list[int]]]:
    return [([i + 1] * (1 + i % 3), [i + 1] * (1 + i % 3)) for i in range(n)]


def _ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_batch_stream_deterministic_epochs():
    a, b = BatchStream(_encoded(10), 4, 0, seed=1), BatchStream(_encoded(10), 4, 0, seed=1)
    first = [_ids(a.next_batch()) for _ in range(6)]
    assert first == [_ids(b.next_batch()) for _ in range(6)]
    assert [len(x) for x in first] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(first[:3], [])) == list(range(1, 11))  # each epoch covers all once
    assert sum(first[:3], []) != sum(first[3:], [])  # reshuffled per epoch
    assert a.samples_seen == 20 and a.state_dict() == {
        "epoch": 2, "position": 0, "samples_seen": 20, "num_examples": 10}
    other = BatchStream(_encoded(10), 4, 0, seed=2)
    assert [_ids(other.next_batch()) for _ in range(3)] != first[:3]


def test_batch_stream_resume_from_state():
    a = BatchStream(_encoded(9), 2, 0, seed=5)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # plain ints survive JSON
    b = BatchStream(_encoded(9), 2, 0, seed=5)
    b.load_state_dict(state)
    for _ in range(12):
        x, y = a.next_batch(), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="examples"):
        BatchStream(_encoded(8), 2, 0, seed=5).load_state_dict(state)


def test_batch_stream_smaller_than_batch_size():
    s = BatchStream(_encoded(3), 8, 0, seed=0)
    batches = [_ids(s.next_batch()) for _ in range(4)]
    assert all(sorted(b) == [1, 2, 3] for b in batches)
    assert s.state_dict()["epoch"] == 4 and s.samples_seen == 12
    with pytest.raises(ValueError):
        BatchStream([], 2, 0, 0)


# ---------------------------------------------------------------- synthetic
_CONTEXT_RE = re.compile(r"^name\[[^\]]+\](, (eatType|food|priceRange|customer rating|area|"
                         r"familyFriendly|near)\[[^\]]+\])*$")


def test_synthetic_deterministic_and_well_formed():
    a = synthetic_e2e(300, seed=7)
    assert a == synthetic_e2e(300, seed=7) and a != synthetic_e2e(300, seed=8)
    assert all(_CONTEXT_RE.match(ex.context) for ex in a)
    assert all(ex.completion[0].isupper() and ex.completion.endswith(".") for ex in a)
    assert len({ex.completion.split()[0] for ex in a}) > 3  # several templates
    by_context: dict[str, set[str]] = {}
    for ex in synthetic_e2e(3000, seed=0):
        by_context.setdefault(ex.context, set()).add(ex.completion)
    assert max(map(len, by_context.values())) <= 3  # completion = f(attributes, template)


def test_synthetic_vocabulary_is_covered(tok):
    words = set(synthetic_corpus_words())
    assert {"[", "]", ",", ".", "name", "eatType", "riverside"} <= words
    assert words <= set(builtin_vocab())
    unk = tok.unk_token_id
    for ex in synthetic_e2e(2000, seed=11):
        ids, labels = encode(tok, ex, 10_000)
        assert unk not in ids, ex
        emitted = re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", ex.context + " " + ex.completion)
        assert set(emitted) <= words
        assert len(ids) <= 128
