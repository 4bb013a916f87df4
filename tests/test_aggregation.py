"""Tests for common.aggregation: FedAvg against hand computations, mode dispatch, input errors."""
from __future__ import annotations

import pytest
import torch

from common.aggregation import MODES, aggregate, clip_updates, fedavg, update_norm


def _state(a: list[float], b: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"l.lora_A.weight": torch.tensor(a), "l.lora_B.weight": torch.tensor(b)}


def test_fedavg_weights_one_and_three_mix_a_quarter_and_three_quarters() -> None:
    s1 = _state([1.0, 4.0], [[0.0, 8.0]])
    s2 = _state([5.0, 0.0], [[4.0, 4.0]])
    out = fedavg([s1, s2], [1, 3])
    # 0.25 * s1 + 0.75 * s2, worked out by hand
    assert torch.equal(out["l.lora_A.weight"], torch.tensor([4.0, 1.0]))
    assert torch.equal(out["l.lora_B.weight"], torch.tensor([[3.0, 5.0]]))
    assert all(t.dtype == torch.float32 for t in out.values())


def test_fedavg_counts_each_client_exactly_once() -> None:
    states = [_state([float(v), 0.0], [[0.0, 0.0]]) for v in (1, 2, 6)]
    out = fedavg(states, [1, 1, 1])
    assert torch.equal(out["l.lora_A.weight"], torch.tensor([3.0, 0.0]))  # (1 + 2 + 6) / 3
    out = fedavg(states, [2, 1, 1])
    assert torch.equal(out["l.lora_A.weight"], torch.tensor([2.5, 0.0]))  # (2 + 2 + 6) / 4


def test_fedavg_single_client_and_zero_weight_client() -> None:
    s1, s2 = _state([1.0, 2.0], [[3.0, 4.0]]), _state([9.0, 9.0], [[9.0, 9.0]])
    assert torch.equal(fedavg([s1], [7])["l.lora_A.weight"], s1["l.lora_A.weight"])
    assert torch.equal(fedavg([s1, s2], [5, 0])["l.lora_B.weight"], s1["l.lora_B.weight"])


def test_fedavg_computes_in_float64() -> None:
    big, small = 1e8, 1.0
    states = [{"w": torch.tensor([big], dtype=torch.float32)}, {"w": torch.tensor([small], dtype=torch.float32)},
              {"w": torch.tensor([-big], dtype=torch.float32)}]
    assert fedavg(states, [1, 1, 1])["w"].item() == pytest.approx(1 / 3)


def test_fedavg_does_not_modify_inputs() -> None:
    s1, s2 = _state([1.0, 2.0], [[3.0, 4.0]]), _state([5.0, 6.0], [[7.0, 8.0]])
    before = {k: v.clone() for k, v in s1.items()}
    fedavg([s1, s2], [1, 1])
    assert all(torch.equal(before[k], s1[k]) for k in s1)


@pytest.mark.parametrize("states, weights, match", [
    ([], [], "zero adapters"),
    ([_state([1.0], [[1.0]])], [1, 2], "weights"),
    ([_state([1.0], [[1.0]])] * 2, [0, 0], "total weight"),
    ([_state([1.0], [[1.0]])] * 2, [-1, 3], ">= 0"),
    ([_state([1.0], [[1.0]])] * 2, [float("nan"), 3], "finite"),
    ([_state([1.0], [[1.0]]), {"l.lora_A.weight": torch.ones(1)}], [1, 1], "keys differ"),
    ([_state([1.0], [[1.0]]), _state([1.0, 2.0], [[1.0]])], [1, 1], "shape"),
    ([{}], [1], "no tensors"),
])
def test_fedavg_errors(states: list, weights: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fedavg(states, weights)


def test_aggregate_dispatches_and_rejects_unknown_modes() -> None:
    s1, s2 = _state([0.0, 4.0], [[0.0, 0.0]]), _state([4.0, 0.0], [[0.0, 0.0]])
    assert torch.equal(aggregate([s1, s2], [1, 1])["l.lora_A.weight"], torch.tensor([2.0, 2.0]))
    assert "fedavg" in MODES
    with pytest.raises(ValueError, match="unknown aggregation mode 'krum'.*fedavg"):
        aggregate([s1, s2], [1, 1], mode="krum")


# -- robust modes -----------------------------------------------------------------------------------------------
def _flat(values: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


def test_median_is_coordinate_wise_and_counts_each_client_once() -> None:
    states = [_flat([1.0, 10.0]), _flat([2.0, -5.0]), _flat([100.0, 0.0])]
    out = aggregate(states, [1, 1, 1000], mode="median")  # a huge sample count buys no extra vote
    assert torch.equal(out["w"], torch.tensor([2.0, 0.0]))
    even = aggregate(states + [_flat([3.0, 4.0])], [1, 1, 1, 1], mode="median")
    assert torch.equal(even["w"], torch.tensor([2.5, 2.0]))  # the mean of the two middle values


def test_trimmed_mean_drops_the_extremes_of_every_coordinate() -> None:
    states = [_flat([v, -v]) for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    out = aggregate(states, [1] * 5, mode="trimmed-mean", trim_fraction=0.2)  # drops 1 at each end
    assert torch.equal(out["w"], torch.tensor([3.0, -3.0]))
    untrimmed = aggregate(states, [1] * 5, mode="trimmed-mean", trim_fraction=0.0)
    assert torch.allclose(untrimmed["w"], torch.tensor([202.0, -202.0]))
    with pytest.raises(ValueError, match="trim_fraction"):
        aggregate(states, [1] * 5, mode="trimmed-mean", trim_fraction=0.5)


def test_clipping_bounds_each_update_relative_to_the_reference() -> None:
    reference = _flat([1.0, 1.0])
    honest, huge = _flat([1.3, 1.4]), _flat([1.0 + 3e6, 1.0 - 4e6])  # update norms 0.5 and 5e6
    clipped = clip_updates([honest, huge], reference, clip_norm=1.0)
    assert torch.equal(clipped[0]["w"], honest["w"])  # within the bound: unchanged
    assert update_norm(clipped[1], reference) == pytest.approx(1.0)
    assert torch.allclose(clipped[1]["w"] - reference["w"], torch.tensor([0.6, -0.8]))  # direction kept
    out = aggregate([honest, huge], [1, 1_000_000], mode="fedavg", clip_norm=1.0, reference=reference)
    assert update_norm(out, reference) <= 1.0 + 1e-6


def test_clipping_without_reference_is_relative_to_the_median() -> None:
    states = [_flat([0.0]), _flat([1.0]), _flat([1e9])]
    out = aggregate(states, [1, 1, 1], mode="fedavg", clip_norm=0.5)
    # references: the median 1.0; clipped values 0.5, 1.0, 1.5; their mean 1.0
    assert torch.allclose(out["w"], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="clip_norm"):
        clip_updates(states, states[0], clip_norm=float("inf"))


@pytest.mark.parametrize("mode", ["median", "trimmed-mean"])
def test_robust_modes_check_their_inputs(mode: str) -> None:
    with pytest.raises(ValueError, match="keys differ"):
        aggregate([_flat([1.0]), {"v": torch.ones(1)}], [1, 1], mode=mode)
    with pytest.raises(ValueError, match="zero adapters"):
        aggregate([], [], mode=mode)
