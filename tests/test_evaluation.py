"""Evaluation through the split: the loss equals the unsplit model's loss with the same adapters, and the server
adapter does not change by a single bit."""
from __future__ import annotations

import torch

from common.data import IGNORE_INDEX
from splitlora_client.generation.scoring import validate
from tests.support.families import FAMILIES, VOCAB
from tests.support.generation import split_setup
from tests.support.servers import server_fingerprint


def _examples(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n in (9, 5, 12, 7, 3):
        ids = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        items.append((ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return items


def test_evaluate_loss_equals_the_unsplit_model_and_learns_nothing(tmp_path) -> None:
    for family in FAMILIES[:3]:
        with split_setup(family, tmp_path / family) as (harness, client, ref):
            engine = harness.running.engine
            before = {k: v.clone() for k, v in engine.adapter_of("x").items()}
            items = _examples()
            result = validate(client, harness.channel, "eval-0", items, batch_size=2, pad_id=0,
                              fingerprint=server_fingerprint(harness))
            ids = torch.zeros(len(items), 12, dtype=torch.long)
            labels = torch.full_like(ids, IGNORE_INDEX)
            mask = torch.zeros_like(ids)
            for row, (x, y) in enumerate(items):
                ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            with torch.no_grad():
                expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
            assert result.tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())
            assert abs(result.loss - float(expected)) < 1e-5, family
            after = engine.adapter_of("x")
            assert all(torch.equal(before[k], after[k]) for k in before)
