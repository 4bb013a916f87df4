"""Per-client split points and generation: clients of different split layers generate and score through one
server (allowing split layers 1..3), each through its own K, token for token and loss for loss as the unsplit
model; a split layer outside the range is refused naming it, and the server keeps serving."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F

from common.split.parts import SplitPart
from splitlora_client.generation.scoring import validate
from tests.support.families import copy_adapter
from tests.support.generation import left_padded, split_model, split_setup
from tests.support.servers import fingerprint_for
from tests.support.split_reference import EXACT


def _client(harness, ref, k: int) -> SplitPart:
    client = SplitPart(harness.running.part.model_dir, "client", k, EXACT).eval()
    copy_adapter(ref, client)
    return client


def _fingerprint(harness, k: int):
    return fingerprint_for(str(harness.running.part.model_dir), k, harness.config.lora_settings())


def test_each_client_generates_and_scores_through_its_own_split_layer(tmp_path: Path) -> None:
    with split_setup("gpt2", tmp_path, split_range="1:3") as (harness, _, ref):
        ids, mask = left_padded((5, 3), seed=4)
        kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
        examples = [([3, 9, 4, 7, 11, 2], [-100, -100, 4, 7, 11, 2]), ([5, 8, 6], [-100, 8, 6])]
        with torch.no_grad():
            expected = ref.generate(input_ids=ids, attention_mask=mask, **kwargs)
            sums = [F.cross_entropy(ref(input_ids=torch.tensor([i])).logits[0, :-1], torch.tensor(l[1:]),
                                    ignore_index=-100, reduction="sum") for i, l in examples]
        for k in (1, 3):
            client = _client(harness, ref, k)
            model = split_model(harness, client, f"gen-{k}", fingerprint=_fingerprint(harness, k))
            with torch.no_grad():
                assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), expected), k
            scored = validate(client, harness.channel, f"gen-{k}", examples, 2, 0, _fingerprint(harness, k))
            assert abs(scored.loss - float(sum(sums)) / 6) < 1e-5, (k, scored.loss)

        far = type(_fingerprint(harness, 3))()
        far.CopyFrom(_fingerprint(harness, 3))
        far.split_layer = 4
        model = split_model(harness, _client(harness, ref, 3), "far", fingerprint=far)
        with pytest.raises(grpc.RpcError) as refused, torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "split layer 4 is outside the server's --split-range 1:3" in refused.value.details()
        model = split_model(harness, _client(harness, ref, 1), "near", fingerprint=_fingerprint(harness, 1))
        with torch.no_grad():  # the server serves on
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), expected)
