"""Segments: a part is a range of blocks (with the embeddings and/or the head), and a part's forward takes a KV
cache: decoding token by token through a split with a cache on each side gives the logits of the uncached
full-sequence pass."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from common.split.parts import Segment, SplitError, SplitPart
from tests.support.families import FAMILIES, NUM_LAYERS, VOCAB, checkpoint_dir, copy_adapter, reference
from tests.support.split_reference import EXACT

LENGTHS = (7, 4)  # left-padded prompts of different lengths, as a generator batches them


def _left_padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(LENGTHS)
    ids, mask = torch.zeros(len(LENGTHS), width, dtype=torch.long), torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        ids[row, width - n:] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _parts(family: str, split: int) -> tuple[SplitPart, SplitPart]:
    model_dir = checkpoint_dir(family)
    client = SplitPart(model_dir, Segment(0, split, embeds=True), lora=EXACT).eval()
    server = SplitPart(model_dir, Segment(split, NUM_LAYERS, head=True), lora=EXACT).eval()
    copy_adapter(reference(model_dir, EXACT), client, server)  # non-zero LoRA B on both sides
    return client, server


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cached_decode_steps_equal_the_uncached_full_sequence(family: str) -> None:
    client, server = _parts(family, split=2)
    ids, mask = _left_padded()
    new = torch.randint(1, VOCAB, (len(LENGTHS), 3), generator=torch.Generator().manual_seed(1))
    whole_ids, whole_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    positions = _positions(whole_mask)
    full = server(client(whole_ids, whole_mask, positions), whole_mask, positions)

    client_cache, server_cache = DynamicCache(), DynamicCache()
    width = ids.shape[1]
    prefill = server(client(ids, mask, positions[:, :width], client_cache), mask, positions[:, :width], server_cache)
    torch.testing.assert_close(prefill[:, -1], full[:, width - 1], rtol=0, atol=1e-5)
    for t in range(new.shape[1]):  # one new token at a time: only its activations cross the cut
        seen = whole_mask[:, :width + t + 1]
        pos = positions[:, width + t:width + t + 1]
        hidden = client(new[:, t:t + 1], seen, pos, client_cache)
        assert hidden.shape[1] == 1
        logits = server(hidden, seen, pos, server_cache)
        torch.testing.assert_close(logits[:, -1], full[:, width + t], rtol=0, atol=1e-5)
    assert server_cache.get_seq_length(layer_idx=2) == whole_ids.shape[1]


def test_the_side_names_are_segments(tiny_gpt2_dir) -> None:
    client = SplitPart(tiny_gpt2_dir, "client", 2)
    server = SplitPart(tiny_gpt2_dir, "server", 2)
    num_layers = client.num_layers
    assert client.segment == Segment(0, 2, embeds=True) and server.segment == Segment(2, num_layers, head=True)
    assert (client.side, client.split_layer, server.side, server.split_layer) == ("client", 2, "server", 2)


@pytest.mark.parametrize("segment, match", [
    (Segment(2, 2), "non-empty range"),
    (Segment(1, 3, embeds=True), "must start at block 0"),
    (Segment(0, 2, head=True), "must end at block"),
])
def test_impossible_segments_are_refused(tiny_gpt2_dir, segment: Segment, match: str) -> None:
    with pytest.raises(SplitError, match=match):
        SplitPart(tiny_gpt2_dir, segment)


def test_a_middle_segment_holds_only_its_blocks(tiny_gpt2_dir) -> None:
    middle = SplitPart(tiny_gpt2_dir, Segment(1, 3), lora=EXACT)
    names = {n for n, _ in middle.base.named_parameters()}
    assert names and all(".h.1." in n or ".h.2." in n for n in names)
    hidden = torch.randn(2, 5, middle.hidden_size)
    mask = torch.ones(2, 5, dtype=torch.long)
    assert middle(hidden, mask, _positions(mask)).shape == hidden.shape
