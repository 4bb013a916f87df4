"""The U-shaped split changes nothing: client bottom -> server middle -> client top (loss on the client) equals the
unsplit peft model in loss and in every LoRA gradient, for every family and several (K, J), with padding; the
server's batched path equals its single-step path; the exported adapter of the three parts loads on the unsplit
model and gives the split pipeline's logits."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from common.lora import adapter_state, export_adapter
from common.split.parts import SplitPart
from common.split.segment import Segment, SplitError, u_shape_segments
from common.split.ushape import u_shape_parts
from splitlora_client.ushape import TopHead
from splitlora_server.engine import compute
from splitlora_server.engine.jobs import Step
from tests.support.families import FAMILIES, NUM_LAYERS, VOCAB, checkpoint_dir, copy_adapter, reference
from tests.support.split_reference import EXACT, lora_params, model_loss, padded_batch

BATCH = padded_batch(VOCAB, lengths=(9, 5, 7), seed=3)
CUTS = [(1, 0), (1, 2), (2, 1), (3, 0)]  # (K, J): the server keeps blocks [K, L-J), at least one


def _parts(model_dir: Path, k: int, j: int) -> tuple[SplitPart, SplitPart, SplitPart]:
    return tuple(SplitPart(model_dir, seg, None, EXACT).eval() for seg in u_shape_parts(model_dir, k, j))


def u_step(bottom: SplitPart, middle: SplitPart, top: SplitPart, batch: dict[str, torch.Tensor]):
    """One u-shape step as the protocol runs it (the server's probe and compute path, the client's TopHead);
    returns the client's loss and the top-cut activations; gradients are left in .grad."""
    mask, pos = batch["attention_mask"], batch["position_ids"]
    hidden = bottom(batch["input_ids"], mask, pos)
    step = Step("c", 0, hidden.detach(), mask, pos, None)
    top_hidden = compute.probe(middle, step)
    head = TopHead(top, label_smoothing=0.0)
    result = head.step(top_hidden, batch)
    head.apply(result)
    pending = compute.forward(middle, [dataclasses.replace(step, top_grad=result.top_grad)], 0.0)
    compute.backward(pending)
    hidden.backward(compute.outcomes(pending)[0].grad)
    return torch.tensor(result.loss), top_hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_u_shape_equals_unsplit(family: str) -> None:
    model_dir = checkpoint_dir(family)
    ref = reference(model_dir, EXACT)
    expected = model_loss(ref, BATCH)
    expected.backward()
    ref_grads = {n: p.grad for n, p in lora_params(ref).items()}
    for k, j in CUTS:
        parts = _parts(model_dir, k, j)
        copy_adapter(ref, *(p for p in parts if p.peft is not None))
        loss, _ = u_step(*parts, BATCH)
        grads = {n: p.grad for part in parts if part.peft is not None for n, p in lora_params(part.peft).items()}
        assert set(grads) == set(ref_grads), f"{family} at K={k}, J={j}: LoRA parameters differ"
        torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=0)
        for name, grad in grads.items():
            assert grad is not None and grad.abs().sum() > 0, name
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5,
                                       msg=f"{family} u-shape K={k} J={j}: {name}")


def test_batched_u_shape_group_equals_single_steps(tiny_gpt2_dir: Path) -> None:
    """Two clients' top-cut gradients stacked into one server computation give each its own cut gradient."""
    _, middle, _ = _parts(tiny_gpt2_dir, 1, 1)
    gen = torch.Generator().manual_seed(0)
    steps = []
    for n, seq in ((2, 7), (3, 4)):
        mask = torch.ones(n, seq, dtype=torch.int64)
        mask[0, seq - 2:] = 0
        steps.append(Step(f"c{n}", 0, torch.randn(n, seq, 32, generator=gen), mask,
                          torch.arange(seq).expand(n, seq).clone(), None, torch.randn(n, seq, 32, generator=gen)))
    middle.peft.zero_grad()
    together = compute.forward(middle, steps, 0.0)
    compute.backward(together)
    for step, got in zip(steps, compute.outcomes(together)):
        alone = compute.forward(middle, [step], 0.0)
        compute.backward(alone)
        torch.testing.assert_close(got.grad, compute.outcomes(alone)[0].grad, atol=1e-5, rtol=1e-5)
        assert (got.loss, got.tokens) == (0.0, 0)  # the server never learns the loss


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_u_shape_export_loads_on_the_unsplit_model(family: str, tmp_path: Path) -> None:
    model_dir = checkpoint_dir(family)
    parts = _parts(model_dir, 1, 2)
    copy_adapter(reference(model_dir, EXACT), *parts)  # J = 2: every part has blocks, so an adapter
    bottom, middle, top = parts
    out = export_adapter(tmp_path / "adapter", bottom.lora.peft_config(bottom.family),
                         *(adapter_state(p.peft) for p in parts), base_model=str(model_dir))
    mask, pos = BATCH["attention_mask"], BATCH["position_ids"]
    with torch.no_grad():
        split_logits = top(middle(bottom(BATCH["input_ids"], mask, pos), mask, pos), mask, pos)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out)).eval()
        logits = model(input_ids=BATCH["input_ids"], attention_mask=mask, position_ids=pos).logits
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], split_logits[keep], atol=1e-4, rtol=1e-4)


def test_u_shape_segments_are_checked() -> None:
    assert u_shape_segments(2, 0, NUM_LAYERS) == (Segment(0, 2, embeds=True), Segment(2, 4),
                                                  Segment(4, 4, head=True))
    with pytest.raises(SplitError, match=r"top blocks J=2 must be in \[0, 0\]"):
        u_shape_segments(3, 2, NUM_LAYERS)
    with pytest.raises(SplitError, match="not a non-empty range"):
        Segment(2, 2).check(NUM_LAYERS)  # only the head may stand alone
