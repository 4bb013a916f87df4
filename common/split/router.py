"""The mixture-of-experts router's auxiliary (load-balancing) loss, split exactly between the two sides.

Unsplit, transformers adds `router_aux_loss_coef * aux` to the loss when the config sets `output_router_logits`,
with (`load_balancing_loss_func`, every MoE layer, padding masked out):

    aux = E * sum_e (counts_e / N) * (probs_e / N)

where, summed over the layers, `counts` are the top-k assignments of each expert, `probs` the routing
probabilities, and N the unpadded rows. All three are sums over layers, so each side sums its own layers
(`RouterStats`): the client sends its counts, probs and rows with the activations, the server adds its own,
computes the loss, and returns d loss / d probs (counts carry no gradient, as unsplit), which the client
back-propagates into its routers together with the gradient at the cut.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RouterSpec:
    """Where a family's routers are (relative to a block) and which config keys size them."""

    path: str = "mlp.gate"               # its forward returns the router logits first
    experts: str = "num_local_experts"
    top_k: str = "num_experts_per_tok"


@dataclass(frozen=True)
class RouterAux:
    """The auxiliary loss a config asks for."""

    coef: float
    num_experts: int
    top_k: int


def router_aux(family: Any, config: Any) -> RouterAux | None:
    """The auxiliary loss of this model, or None (no router, or `output_router_logits` off: no aux loss)."""
    spec: RouterSpec | None = getattr(family, "router", None)
    if spec is None or not getattr(config, "output_router_logits", False):
        return None
    return RouterAux(float(config.router_aux_loss_coef), int(getattr(config, spec.experts)),
                     int(getattr(config, spec.top_k)))


@dataclass
class RouterStats:
    """Sums over some layers: top-k assignments and routing probabilities per expert, and unpadded rows."""

    counts: torch.Tensor  # (experts,) float32, no gradient
    probs: torch.Tensor   # (experts,) float32, differentiable on the side that computed it
    rows: torch.Tensor    # () float32

    def __add__(self, other: "RouterStats") -> "RouterStats":
        return RouterStats(self.counts + other.counts, self.probs + other.probs, self.rows + other.rows)

    def detached(self) -> "RouterStats":
        """A copy without autograd history (what crosses the wire)."""
        return RouterStats(self.counts.detach(), self.probs.detach(), self.rows.detach())


def layer_stats(logits: torch.Tensor, attention_mask: torch.Tensor, aux: RouterAux) -> RouterStats:
    """One layer's statistics, computed as `load_balancing_loss_func` computes them (same ops, same dtypes)."""
    flat_mask = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)
    weights = torch.nn.functional.softmax(logits, dim=-1)
    _, selected = torch.topk(weights, aux.top_k, dim=-1)
    counts = torch.zeros(aux.num_experts, dtype=torch.float32, device=logits.device).scatter_add_(
        0, selected.reshape(-1), flat_mask.repeat_interleave(aux.top_k))
    return RouterStats(counts, (weights.float() * flat_mask.unsqueeze(-1)).sum(dim=0), flat_mask.sum())


def aux_loss(stats: RouterStats, aux: RouterAux) -> torch.Tensor:
    """The load-balancing loss of statistics summed over every layer of the model (not yet times the coef)."""
    return torch.sum(stats.counts / stats.rows * (stats.probs / stats.rows).unsqueeze(0)) * aux.num_experts


class RouterRecorder:
    """Within `with`, records the router logits of a part's blocks; `stats()` sums their statistics.

    A no-op (stats None) for models without an auxiliary loss. With gradient checkpointing, the logits of the
    first forward are the ones used (a recomputation in backward overwrites, after `stats()` has read them).
    """

    def __init__(self, part: Any, attention_mask: torch.Tensor) -> None:
        self.aux = router_aux(part.family, part.config)
        self.mask, self.logits = attention_mask, {}
        layers = part.base.get_submodule(part.family.layers_path)
        self.routers: dict[int, nn.Module] = {} if self.aux is None else {
            i: layers[i].get_submodule(part.family.router.path) for i in part.layer_range()}
        self._hooks: list[Any] = []

    def __enter__(self) -> "RouterRecorder":
        for i, router in self.routers.items():
            self._hooks.append(router.register_forward_hook(
                lambda _m, _args, out, i=i: self.logits.__setitem__(i, out[0])))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def stats(self, span: tuple[int, int, int] | None = None) -> RouterStats | None:
        """This part's statistics, summed over its layers in order (None without an auxiliary loss); with a
        `span` (first row, end row, own length), those of one step stacked with others' into the batch."""
        if self.aux is None:
            return None
        missing = sorted(set(self.routers) - set(self.logits))
        if missing:
            raise RuntimeError(f"routers of layers {missing} did not run")
        mask = self.mask if span is None else self.mask[span[0]:span[1], :span[2]]
        per_layer = [layer_stats(self._logits(i, span), mask, self.aux) for i in sorted(self.routers)]
        total = per_layer[0]
        for s in per_layer[1:]:
            total = total + s
        return total

    def _logits(self, layer: int, span: tuple[int, int, int] | None) -> torch.Tensor:
        logits = self.logits[layer]  # (rows * width, experts)
        if span is None:
            return logits
        a, b, t = span
        return logits.view(*self.mask.shape, -1)[a:b, :t].reshape(-1, logits.shape[-1])

    def aux_term(self, client: RouterStats | None,
                 span: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Server: `coef * aux` over the client's layers (`client`, from the wire) and this part's (of one step's
        `span` in a stacked batch), and the leaf whose gradient goes back to the client (its probs). Raises
        ValueError when the client sent none."""
        if self.aux is None:
            raise ValueError("this model has no router auxiliary loss")
        if client is None:
            raise ValueError("router statistics of the client's layers are missing; the router's auxiliary loss "
                             "(output_router_logits) needs them")
        probs = client.probs.detach().clone().requires_grad_(True)
        total = RouterStats(client.counts, probs, client.rows) + self.stats(span)
        return self.aux.coef * aux_loss(total, self.aux), probs


def backward_through_cut(hidden: torch.Tensor, grad: torch.Tensor, stats: RouterStats | None,
                         probs_grad: torch.Tensor | None) -> None:
    """Client: back-propagate the server's gradient at the cut and, with router statistics, the gradient of the
    loss with respect to their routing probabilities, in one backward pass."""
    if stats is None:
        hidden.backward(grad.to(hidden.dtype))
        return
    if probs_grad is None:
        raise RuntimeError("the server returned no gradient for the router statistics it was sent")
    torch.autograd.backward([hidden, stats.probs], [grad.to(hidden.dtype), probs_grad.to(stats.probs.dtype)])
