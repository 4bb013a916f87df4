"""Split generation over real gRPC on loopback: token for token what transformers' `generate` gives on the unsplit
model with the same adapters (and merged), for every family; beam search; seeded sampling; cached == uncached."""
from __future__ import annotations

import pytest
import torch

from tests.support.families import FAMILIES
from tests.support.generation import left_padded, sessions_freed, split_model, split_setup

PROMPTS = (7, 3, 5)


def _generate(model, ids, mask, **kwargs):
    torch.manual_seed(kwargs.pop("seed", 0))
    if getattr(model.config, "output_router_logits", False):
        # the router's auxiliary loss is a training term; transformers' own generate cannot compute it on decode
        # steps (the mask covers the whole sequence, the router logits only the new token), so leave it off
        kwargs["output_router_logits"] = False
    return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_and_beam_search_equal_unsplit_generate(family: str, tmp_path) -> None:
    ids, mask = left_padded(PROMPTS)
    with split_setup(family, tmp_path) as (harness, client, ref):
        split = split_model(harness, client)
        for kwargs in ({"do_sample": False, "max_new_tokens": 6},
                       {"do_sample": False, "num_beams": 4, "max_new_tokens": 5}):
            expected = _generate(ref, ids, mask, **kwargs)
            assert torch.equal(_generate(split, ids, mask, **kwargs), expected), kwargs
        merged = ref.merge_and_unload()
        assert torch.equal(_generate(merged, ids, mask, do_sample=False, max_new_tokens=6),
                           _generate(split, ids, mask, do_sample=False, max_new_tokens=6))
        assert sessions_freed(harness) == (0, 0)  # every session ended and freed


def test_seeded_sampling_is_reproducible_and_matches_unsplit(tmp_path) -> None:
    ids, mask = left_padded(PROMPTS)
    kwargs = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "max_new_tokens": 6, "seed": 3}
    with split_setup("gpt2", tmp_path) as (harness, client, ref):
        split = split_model(harness, client)
        first = _generate(split, ids, mask, **kwargs)
        assert torch.equal(first, _generate(split, ids, mask, **kwargs))
        assert torch.equal(first, _generate(ref, ids, mask, **kwargs))


def test_top_k_answers_give_the_same_greedy_tokens_with_smaller_replies(tmp_path) -> None:
    ids, mask = left_padded(PROMPTS)
    kwargs = {"do_sample": False, "max_new_tokens": 5}
    with split_setup("llama", tmp_path) as (harness, client, ref):
        full, top = split_model(harness, client), split_model(harness, client, reply="top_k", top_k=3)
        assert torch.equal(_generate(top, ids, mask, **kwargs), _generate(ref, ids, mask, **kwargs))
        _generate(full, ids, mask, **kwargs)
        assert top.bytes_received < full.bytes_received / 4
        status = harness.status()
        assert status.generation_tokens == 2 * len(PROMPTS) * (ids.shape[1] + 4)  # prefill + 4 decode steps, twice
