"""Tests for common.aggregation: FedAvg against hand computations, mode dispatch, input errors."""
from __future__ import annotations

import pytest
import torch

from common.aggregation import MODES, aggregate, fedavg


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
    with pytest.raises(ValueError, match="unknown aggregation mode 'median'.*fedavg"):
        aggregate([s1, s2], [1, 1], mode="median")
