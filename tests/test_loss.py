"""The loss shifts the labels, not the logits: the same value and the same gradients as slicing the logits, and
micro-batches' shares add up to the step's mean loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.loss import IGNORE_INDEX, causal_lm_loss, target_tokens


def _sliced_logits_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The former formula: a copy of logits[:, :-1] against labels[:, 1:]."""
    shift = logits[:, :-1, :].float()
    return F.cross_entropy(shift.reshape(-1, shift.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 17, 101, generator=g) * 3
    labels = torch.randint(0, 101, (3, 17), generator=g)
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[2, 12:] = IGNORE_INDEX  # padding
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_shifted_labels_give_the_sliced_logits_loss_and_gradients(smoothing: float):
    logits, labels = _case()
    new = logits.clone().requires_grad_(True)
    old = logits.clone().requires_grad_(True)
    loss, tokens = causal_lm_loss(new, labels, smoothing)
    reference = _sliced_logits_loss(old, labels, smoothing)
    loss.backward()
    reference.backward()
    assert tokens == int((labels[:, 1:] != IGNORE_INDEX).sum()) == target_tokens(labels)
    assert torch.equal(loss, reference)  # bit for bit, value and gradients
    assert torch.equal(new.grad[:, :-1], old.grad[:, :-1])
    assert torch.equal(new.grad[:, -1], torch.zeros_like(new.grad[:, -1]))  # the last position predicts nothing


def test_the_logits_are_not_copied():
    logits, labels = _case()
    seen: list[int] = []
    orig = F.cross_entropy

    def spy(inp, *args, **kwargs):
        seen.append(inp.untyped_storage().data_ptr())
        return orig(inp, *args, **kwargs)

    F.cross_entropy = spy
    try:
        causal_lm_loss(logits, labels, 0.1)
    finally:
        F.cross_entropy = orig
    assert seen == [logits.untyped_storage().data_ptr()]  # the loss reads the logits' own memory


def test_micro_batch_shares_add_up_to_the_step_loss():
    logits, labels = _case(1)
    whole, tokens = causal_lm_loss(logits, labels, 0.1)
    shares = [causal_lm_loss(logits[i:i + 1], labels[i:i + 1], 0.1, normalizer=tokens)[0] for i in range(3)]
    torch.testing.assert_close(sum(shares), whole, rtol=1e-6, atol=0)


def test_no_target_tokens_gives_zero_with_a_graph():
    logits = torch.randn(1, 4, 7, requires_grad=True)
    loss, tokens = causal_lm_loss(logits, torch.full((1, 4), IGNORE_INDEX))
    loss.backward()
    assert tokens == 0 and float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
