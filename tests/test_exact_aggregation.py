"""Exact LoRA aggregation through the real Aggregator over gRPC: three clients of a real client part train a few
steps, submit with unequal sample counts, and the global adapter's B·A (+ the folded residual) equals the
sample-weighted mean of their B_i·A_i, for ffa and fedex, for every family. FedAvg's error on the same round is
reported (and is not small). A client that loads the global adapter computes exactly the averaged model."""
from __future__ import annotations

from typing import Iterator

import grpc
import pytest
import torch

from common.aggregation import ClientUpdate, build_strategy
from common.lora import adapter_state, load_adapter_state
from common.residuals import ResidualFolder, effective_products, lora_pairs, split_residuals
from common.split.parts import LoraSettings, SplitPart
from splitlora_client.aggregator import fetch_global, submit_adapter
from splitlora_server.aggregator.service import AggregatorService
from tests.support.families import FAMILIES, checkpoint_dir
from tests.support.loopback import AggregatorServers

LORA = LoraSettings(dropout=0.0)
SAMPLES = (5, 11, 23)
SPLIT = 2


def client_part(family: str, freeze_a: bool) -> SplitPart:
    part = SplitPart(checkpoint_dir(family), "client", SPLIT, LORA, lora_seed=7)
    if freeze_a:
        for name, param in part.peft.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return part


def inputs(part: SplitPart, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, part.vocab_size, (2, 7), generator=gen)
    return ids, torch.ones_like(ids), torch.arange(7).expand(2, 7)


def trained_client(family: str, seed: int, freeze_a: bool) -> dict[str, torch.Tensor]:
    """A client part after three AdamW steps on its own data (a different objective per client: non-IID)."""
    part = client_part(family, freeze_a)
    opt = torch.optim.AdamW([p for p in part.parameters() if p.requires_grad], lr=5e-2)
    target = torch.randn(part.hidden_size, generator=torch.Generator().manual_seed(100 + seed))
    for step in range(3):
        opt.zero_grad()
        hidden = part(*inputs(part, seed * 10 + step))
        (hidden - target).pow(2).mean().backward()
        opt.step()
    return adapter_state(part.peft)


@pytest.fixture
def aggregator() -> Iterator:
    servers = AggregatorServers()
    yield lambda mode: servers.serve(AggregatorService(3, 1, None, strategy=build_strategy(mode)))
    servers.close()


def one_round(stub, states: list[dict]) -> dict[str, torch.Tensor]:
    for i, state in enumerate(states):
        submit_adapter(stub, f"c{i}", 0, SAMPLES[i], state, timeout=30)
    glob, clients, total = fetch_global(stub, "c0", 0, timeout=30)
    assert (clients, total) == (3, sum(SAMPLES))
    return glob


def weighted_products(states: list[dict]) -> dict[str, torch.Tensor]:
    total = sum(SAMPLES)
    products = [effective_products(s) for s in states]
    return {k: sum(w / total * p[k] for w, p in zip(SAMPLES, products)) for k in products[0]}


def relative_error(glob: dict, exact: dict) -> float:
    got = effective_products(glob)
    return max(float((got[k] - exact[k]).norm() / exact[k].norm()) for k in exact)


@pytest.mark.parametrize("family", FAMILIES)
def test_ffa_and_fedex_are_exact_fedavg_is_not(family: str, aggregator, record_property) -> None:
    errors = {}
    for mode in ("fedavg", "ffa", "fedex"):
        states = [trained_client(family, seed, freeze_a=mode == "ffa") for seed in range(3)]
        exact = weighted_products(states)
        glob = one_round(aggregator(mode), states)
        errors[mode] = relative_error(glob, exact)
        if mode != "fedavg":
            for key, value in exact.items():  # absolute, on products of order 1e-1 .. 1
                torch.testing.assert_close(effective_products(glob)[key], value, atol=1e-6, rtol=0)
    record_property("relative_error", errors)
    print(f"{family}: relative error of B·A after one round: {errors}")
    assert errors["ffa"] < 1e-6 and errors["fedex"] < 1e-6
    assert errors["fedavg"] > 1e-3  # averaging A and B separately misses mean(B_i·A_i)


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_a_client_loading_the_fedex_global_computes_the_averaged_model(family: str, aggregator) -> None:
    states = [trained_client(family, seed, freeze_a=False) for seed in range(3)]
    glob = one_round(aggregator("fedex"), states)
    adapter, residuals = split_residuals(glob)
    assert set(residuals) == {p + ".fedex_residual" for p in lora_pairs(adapter)}

    client = client_part(family, freeze_a=False).eval()
    load_adapter_state(client.peft, adapter)
    # the reference: B = 0 and the exact averaged update merged into the base weights by hand
    reference = client_part(family, freeze_a=False).eval()
    exact = weighted_products(states)
    with torch.no_grad():
        modules = dict(reference.peft.named_modules())
        for prefix, update in exact.items():
            layer = modules[prefix]
            delta = (update * layer.scaling["default"]).float()
            layer.get_base_layer().weight += delta.T if layer.fan_in_fan_out else delta
            layer.lora_B["default"].weight.zero_()
        ids = inputs(client, 99)
    folder = ResidualFolder(client.peft)
    folder.fold(residuals)
    folder.fold(residuals)  # folding the same cumulative residual again (a resumed holder) changes nothing
    with torch.no_grad():
        torch.testing.assert_close(client(*ids), reference(*ids), atol=1e-5, rtol=0)


def test_ffa_refuses_a_client_that_trained_a(aggregator) -> None:
    states = [trained_client("gpt2", 0, freeze_a=True), trained_client("gpt2", 1, freeze_a=True),
              trained_client("gpt2", 2, freeze_a=False)]
    stub = aggregator("ffa")
    for i, state in enumerate(states[:2]):
        submit_adapter(stub, f"c{i}", 0, SAMPLES[i], state, timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        submit_adapter(stub, "c2", 0, SAMPLES[2], states[2], timeout=30)
    assert "ffa" in info.value.details() and "c2" in info.value.details() and "lora_A" in info.value.details()


def test_fedex_residual_accumulates_over_rounds() -> None:
    """Round 2's residual is round 1's plus its own: the global state is all a holder (or a restart) needs."""
    strategy = build_strategy("fedex")
    rounds = [[trained_client("gpt2", 3 * r + i, freeze_a=False) for i in range(3)] for r in range(2)]
    first = strategy.aggregate(0, [ClientUpdate(f"c{i}", s, w) for i, (s, w) in enumerate(zip(rounds[0], SAMPLES))],
                               None)
    second = strategy.aggregate(1, [ClientUpdate(f"c{i}", s, w) for i, (s, w) in enumerate(zip(rounds[1], SAMPLES))],
                                first)
    alone = strategy.aggregate(1, [ClientUpdate(f"c{i}", s, w) for i, (s, w) in enumerate(zip(rounds[1], SAMPLES))],
                               None)
    for key, value in split_residuals(second)[1].items():
        torch.testing.assert_close(value, split_residuals(first)[1][key] + split_residuals(alone)[1][key],
                                   atol=1e-6, rtol=0)
