"""Activation defenses: clipping bounds every sent token's norm, noise is seeded and scaled by the clip, NoPeek's
distance correlation behaves as a dependence measure and reaches the client's adapter, the epsilon arithmetic, and
the product applies the defense before anything is sent (checked on the captured wire)."""
from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import torch

from splitlora_bench.privacy_wire import Capture, forward_steps
from common.config.engine import ConfigError
from common.defenses import ActivationDefense, DefenseSettings, clip_rows, distance_correlation, gaussian_epsilon
from common.split.parts import SplitPart
from splitlora_client.options import TrainConfig
from splitlora_client.trainer import train
from splitlora_server.app import start_server
from splitlora_server.options import ServeConfig
from tests.support.split_reference import EXACT, padded_batch


def test_clipping_bounds_each_token_and_leaves_padding() -> None:
    hidden = torch.randn(2, 5, 8) * 10
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = ActivationDefense(DefenseSettings(clip=1.5)).apply(hidden, mask)
    assert torch.all(out[mask.bool()].norm(dim=-1) <= 1.5 + 1e-5)
    assert torch.equal(out[~mask.bool()], hidden[~mask.bool()])
    small = torch.full((1, 1, 4), 0.1)
    assert torch.equal(clip_rows(small, 1.5), small)  # under the bound: unchanged


def test_noise_is_scaled_by_the_clip_and_seeded() -> None:
    hidden, mask = torch.zeros(4, 64, 32), torch.ones(4, 64, dtype=torch.int64)
    defense = ActivationDefense(DefenseSettings(clip=2.0, noise=0.5))
    torch.manual_seed(3)
    a = defense.apply(hidden, mask)
    torch.manual_seed(3)
    assert torch.equal(a, defense.apply(hidden, mask))
    assert abs(float(a.std()) - 1.0) < 0.05  # std = noise x clip


def test_noise_from_the_clients_generator_ignores_the_global_one() -> None:
    """The client's noise comes from its per-step generator: another thread reseeding or drawing from torch's
    global generator (an in-process server between two micro-batches) changes nothing."""
    hidden, mask = torch.zeros(2, 8, 16), torch.ones(2, 8, dtype=torch.int64)
    defense = ActivationDefense(DefenseSettings(clip=1.0, noise=1.0))
    draws = []
    for global_seed in (0, 1):
        generator = torch.Generator().manual_seed(7)
        first = defense.apply(hidden[:1], mask[:1], generator)
        torch.manual_seed(global_seed)  # what a server in the same process does for its own step
        torch.randn(100)
        draws.append(torch.cat([first, defense.apply(hidden[1:], mask[1:], generator)]))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0][0], draws[0][1])  # the second micro-batch goes on, it does not repeat


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="set --defense-clip too"):
        DefenseSettings(noise=1.0).check()
    with pytest.raises(ConfigError, match="set --defense-clip too"):
        TrainConfig(defense_noise=1.0, insecure=True).validate()
    with pytest.raises(ValueError, match=">= 0"):
        DefenseSettings(clip=-1.0).check()


def test_distance_correlation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(distance_correlation(x, x @ torch.randn(6, 3, generator=gen) + 1)) > 0.6  # a linear map of x
    assert float(distance_correlation(x, torch.randn(200, 3, generator=gen))) < 0.3


def test_nopeek_term_reaches_the_client_adapter(tiny_gpt2_dir: Path) -> None:
    part = SplitPart(tiny_gpt2_dir, "client", 2, EXACT)
    batch = padded_batch(part.vocab_size, seed=1)
    grads = []
    for weight in (0.0, 5.0):
        part.peft.zero_grad()
        hidden = part(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        ActivationDefense(DefenseSettings(nopeek=weight)).backward(part, batch, hidden, torch.ones_like(hidden))
        grads.append(torch.cat([p.grad.flatten() for p in part.parameters() if p.requires_grad]))
    assert not torch.allclose(grads[0], grads[1])


def test_gaussian_epsilon() -> None:
    # one release of a 1-token example with sigma = 2: rho = 2*1/4 = 0.5; eps = 0.5 + 2 sqrt(0.5 ln(1e5))
    assert gaussian_epsilon(2.0, 1, 1, 1e-5) == pytest.approx(0.5 + 2 * math.sqrt(0.5 * math.log(1e5)))
    assert gaussian_epsilon(2.0, 40, 10, 1e-5) > gaussian_epsilon(2.0, 40, 1, 1e-5)
    assert gaussian_epsilon(0.0, 1, 1, 1e-5) == math.inf


def test_the_product_clips_before_sending(tmp_path: Path) -> None:
    running = start_server(ServeConfig(port=0, clients=1, rounds=1, local_steps=2, batch_size=4, warmup_steps=1,
                                       output=str(tmp_path / "server"), insecure=True))
    capture = Capture()
    try:
        train(TrainConfig(server=f"127.0.0.1:{running.port}", client_id="solo", output=str(tmp_path / "solo"),
                          progress=False, builtin_examples=8, insecure=True, defense_clip=0.5),
              observe=lambda channel: grpc.intercept_channel(channel, capture))
        assert running.wait_finished()
    finally:
        running.stop(grace=0)
    steps = forward_steps(capture)
    assert len(steps) == 2
    for step in steps:
        norms = step["hidden"][step["attention_mask"].bool()].norm(dim=-1)
        assert torch.all(norms <= 0.5 + 1e-5) and norms.max() > 0.4
