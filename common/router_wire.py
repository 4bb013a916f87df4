"""Router statistics (mixture-of-experts auxiliary loss) to and from the wire, validated on the way in."""
from __future__ import annotations

import math

import torch

from common.rpc.splitlora.v1 import router_pb2 as rpb
from common.split.router import RouterStats
from common.wire import WireError, decode_tensor, encode_tensor


def encode_stats(stats: RouterStats) -> rpb.RouterStats:
    """The client's statistics as sent with its activations (always float32, raw: they are tiny and exact)."""
    return rpb.RouterStats(expert_counts=encode_tensor(stats.counts.detach().float()),
                           expert_probs=encode_tensor(stats.probs.detach().float()), rows=float(stats.rows))


def _vector(msg, name: str, num_experts: int) -> torch.Tensor:
    if not msg.ByteSize():
        raise WireError(f"router.{name} is missing")
    t = decode_tensor(msg, name=f"router.{name}", max_elements=num_experts)
    if t.dtype != torch.float32 or tuple(t.shape) != (num_experts,):
        raise WireError(f"router.{name} must be float32 of shape [{num_experts}] (one value per expert), "
                        f"got {t.dtype} {list(t.shape)}")
    if (t < 0).any():
        raise WireError(f"router.{name} must not be negative")
    return t


def decode_stats(msg: rpb.RouterStats, num_experts: int) -> RouterStats:
    """The client's statistics, checked against the model's number of experts."""
    if not math.isfinite(msg.rows) or msg.rows <= 0:
        raise WireError(f"router.rows must be a positive count, got {msg.rows}")
    return RouterStats(_vector(msg.expert_counts, "expert_counts", num_experts),
                       _vector(msg.expert_probs, "expert_probs", num_experts),
                       torch.tensor(msg.rows, dtype=torch.float32))


def encode_backward(probs_grad: torch.Tensor, aux_loss: float) -> rpb.RouterBackward:
    """The server's answer for the client's statistics."""
    return rpb.RouterBackward(expert_probs_grad=encode_tensor(probs_grad.detach().float().cpu()), aux_loss=aux_loss)


def decode_backward(msg: rpb.RouterBackward) -> tuple[torch.Tensor, float]:
    """(d loss / d expert_probs, the auxiliary loss term) from the server's answer."""
    return decode_tensor(msg.expert_probs_grad, name="router.expert_probs_grad"), float(msg.aux_loss)
