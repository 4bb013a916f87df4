"""No warning from transformers in every process: the split builds its masks the way the installed transformers
wants them (`cache`, not the deprecated `past_key_values`), for every family."""
from __future__ import annotations

import warnings

import pytest

from tests.support.families import FAMILIES, checkpoint_dir
from tests.support.split_reference import build_parts, padded_batch, split_loss


@pytest.mark.parametrize("family", FAMILIES)
def test_a_split_step_warns_nothing(family: str) -> None:
    client, server = build_parts(checkpoint_dir(family), 1)
    batch = padded_batch(client.vocab_size, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, FutureWarning included, fails the test
        loss = split_loss(client, server, batch)
    assert loss.isfinite()
