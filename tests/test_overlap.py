"""Client overlap: preparing the next batch while the server works changes nothing."""
from __future__ import annotations

from pathlib import Path

import torch

from common.builtin import build_builtin_tokenizer
from common.data import BatchStream, encode, synthetic_e2e
from common.seeding import seed_torch
from common.split.parts import SplitPart
from splitlora_client.prefetch import StepPreparer
from tests.support.solo import solo_run


def test_overlap_on_and_off_train_the_same_adapters(tmp_path: Path, builtin_model_dir: Path):
    # the built-in model and LoRA have dropout on: the random draws must line up too
    on, off = solo_run(tmp_path / "on", 3, overlap=True), solo_run(tmp_path / "off", 3, overlap=False)
    for a, b in zip(on, off):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepared_steps_draw_the_same_dropout_masks(builtin_model_dir: Path):
    part = SplitPart(builtin_model_dir, "client", 3).train()  # dropout in the embedding, blocks and LoRA
    tokenizer = build_builtin_tokenizer()
    encoded = [encode(tokenizer, ex, 64) for ex in synthetic_e2e(8, seed=1)]
    direct, stream = [], BatchStream(encoded, 4, tokenizer.pad_token_id, seed=2)
    for step in range(2):  # what the loop did before overlap existed
        seed_torch(9, "client", "c", step)
        batch = stream.next_batch()
        direct.append(part(batch["input_ids"], batch["attention_mask"], batch["position_ids"]))
    prep = StepPreparer(part, BatchStream(encoded, 4, tokenizer.pad_token_id, seed=2), 9, "c")
    first = prep.prepare(0)
    hidden0 = prep.forward(first)
    second = prep.prepare(1)  # prepared before step 0 is finished
    torch.manual_seed(123), torch.rand(100)  # e.g. a server in this process seeding and drawing meanwhile
    hidden1 = prep.forward(second)
    assert torch.equal(hidden0, direct[0]) and torch.equal(hidden1, direct[1])
