"""A malicious client cannot drag the global adapter: for each robust mode, through the real Aggregator over gRPC.

Four clients per round, three honest and one malicious. Round 0 is honest. In round 1 the malicious client
first submits a NaN adapter (refused, nothing changes), then one with an update of norm ~1e6 and a
sample count of a billion (accepted). The global adapter of round 1 must stay within the configured bound
of round 0's: the clipping norm, and for median and trimmed mean the range the honest clients' values span
(after clipping, when both are on).
Plain FedAvg, for contrast, is dragged a million times further.
"""
from __future__ import annotations

from typing import Iterator

import grpc
import pytest
import torch

from common.aggregation import DEFAULT_TRIM_FRACTION, StrategyOptions, build_strategy, clip_updates, update_norm
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from splitlora_client.aggregator import fetch_global, submit_adapter
from splitlora_server.aggregator.service import AggregatorService
from tests.support.loopback import AggregatorServers

HONEST = ("h0", "h1", "h2")
SHAPES = {"x.lora_A.weight": (4, 16), "x.lora_B.weight": (16, 4)}
HONEST_STEP = 0.05  # per coordinate; honest update norms are about 0.05 * sqrt(128) = 0.57
CLIP = 0.3


def adapter(seed: int, scale: float, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (base[k] if base else torch.zeros(s)) + scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


@pytest.fixture
def serve() -> Iterator:
    servers = AggregatorServers()

    def _serve(mode: str, clip_norm: float = 0.0, trim_fraction: float = DEFAULT_TRIM_FRACTION
               ) -> tuple[AggregatorService, agrpc.AggregatorStub]:
        service = AggregatorService(4, 2, None, strategy=build_strategy(mode, clip_norm,
                                                                        StrategyOptions(trim_fraction)))
        return service, servers.serve(service)

    yield _serve
    servers.close()


def attacked_round(stub: agrpc.AggregatorStub) -> tuple[dict, dict, list[dict]]:
    """Round 0 honest, round 1 attacked; return (global 0, global 1, the honest round-1 adapters)."""
    for i, cid in enumerate((*HONEST, "mallory")):
        submit_adapter(stub, cid, 0, 8, adapter(i, 1.0), timeout=5)
    g0, _, _ = fetch_global(stub, "h0", 0, timeout=5)
    honest = [adapter(10 + i, HONEST_STEP, g0) for i in range(len(HONEST))]
    for cid, state in zip(HONEST, honest):
        submit_adapter(stub, cid, 1, 8, state, timeout=5)
    nan = {k: v.clone() for k, v in g0.items()}
    nan["x.lora_B.weight"][3, 1] = float("nan")
    with pytest.raises(grpc.RpcError) as info:
        submit_adapter(stub, "mallory", 1, 8, nan, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or Inf" in info.value.details()
    huge = adapter(99, 1e6 / 11.3, g0)  # norm ~1e6
    assert update_norm(huge, g0) > 5e5
    assert submit_adapter(stub, "mallory", 1, 10**9, huge, timeout=5).submitted == 4
    g1, num_clients, _ = fetch_global(stub, "h0", 1, timeout=5)
    assert num_clients == 4 and all(torch.isfinite(v).all() for v in g1.values())
    return g0, g1, honest


def within_honest_range(g1: dict, honest: list[dict]) -> bool:
    """Every coordinate of g1 lies between the honest clients' lowest and highest value of it."""
    for key, value in g1.items():
        stacked = torch.stack([h[key] for h in honest])
        if not ((value >= stacked.min(0).values - 1e-6) & (value <= stacked.max(0).values + 1e-6)).all():
            return False
    return True


@pytest.mark.parametrize("mode, clip_norm, trim_fraction", [
    ("fedavg", CLIP, 0.2),
    ("median", 0.0, 0.2),
    ("trimmed-mean", 0.0, 0.25),
    ("median", CLIP, 0.2),
    ("trimmed-mean", CLIP, 0.25),
])
def test_a_malicious_client_moves_the_global_adapter_at_most_the_bound(serve, mode: str, clip_norm: float,
                                                                       trim_fraction: float) -> None:
    service, stub = serve(mode=mode, clip_norm=clip_norm, trim_fraction=trim_fraction)
    g0, g1, honest = attacked_round(stub)
    moved = update_norm(g1, g0)
    if clip_norm:
        assert moved <= clip_norm + 1e-5, f"{mode}: moved {moved} > clip norm {clip_norm}"
    if mode != "fedavg":  # every coordinate within what the honest clients (clipped, when clipping) sent
        reference = clip_updates(honest, g0, clip_norm) if clip_norm else honest
        assert within_honest_range(g1, reference), f"{mode}: a coordinate left the honest clients' range"
    assert service.finished


def test_plain_fedavg_is_dragged_by_the_same_attack(serve) -> None:
    _, stub = serve(mode="fedavg")
    g0, g1, _ = attacked_round(stub)
    assert update_norm(g1, g0) > 1e5  # what the robust modes prevent
