"""Activation defenses the client applies to its cut activations before anything is sent; the product
(the client trainer) and the attack benchmark (`splitlora-bench privacy`) use this one code path.

- Per-token L2 clipping of h_K to `clip` followed by Gaussian noise of std `noise * clip` (the Gaussian mechanism
  on each token's activation; `gaussian_epsilon` says what that does and does not guarantee).
- NoPeek (Vepakomma et al., arXiv 2008.09161): a loss term `nopeek * DCor(X, Z)` between the input embeddings X and
  the sent activations Z, over the batch's tokens, trained into the client's adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NOPEEK_MAX_TOKENS = 256  # tokens of a batch the distance correlation is taken over (an n x n distance matrix)


@dataclass(frozen=True)
class DefenseSettings:
    """What the client does to h_K before sending: clip (per-token L2 norm, 0: off), noise (std as a multiple of
    the clip norm, 0: off), nopeek (weight of the distance-correlation loss, 0: off)."""

    clip: float = 0.0
    noise: float = 0.0
    nopeek: float = 0.0

    def check(self) -> None:
        """Refuse negative values and noise without a clip norm (its scale is relative to it)."""
        if min(self.clip, self.noise, self.nopeek) < 0:
            raise ValueError(f"defense settings must be >= 0, got {self}")
        if self.noise and not self.clip:
            raise ValueError("defense noise is a multiple of the clip norm: set --defense-clip too")

    @property
    def active(self) -> bool:
        """Whether any defense is on."""
        return bool(self.clip or self.noise or self.nopeek)


def clip_rows(hidden: torch.Tensor, clip: float) -> torch.Tensor:
    """Each token's activation scaled down to L2 norm at most `clip` (differentiable)."""
    norms = hidden.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return hidden * (clip / norms).clamp(max=1.0)


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al. 2007) between the rows of x (n, a) and z (n, b), in [0, 1]."""
    def centred(t: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(t, t)
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
    a, b = centred(x.float()), centred(z.float())
    dcov_xz, dvar_x, dvar_z = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (dcov_xz.clamp_min(0) / (dvar_x * dvar_z).sqrt().clamp_min(1e-12)).sqrt()


class ActivationDefense:
    """Applies `DefenseSettings` on the client. The client draws the noise from a generator of its own, seeded per
    step (`StepPreparer.noise_generator`), so a resumed run draws the same noise and nothing else that draws random
    numbers in the process (a server in the same process, between or during micro-batches) changes it."""

    def __init__(self, settings: DefenseSettings = DefenseSettings()) -> None:
        settings.check()
        self.settings = settings

    def apply(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """h_K as it will be sent: clipped per token, then noised (from `generator`, else torch's global one);
        padding rows are left as they are."""
        s = self.settings
        if not s.clip:
            return hidden
        out = clip_rows(hidden, s.clip)
        if s.noise:
            out = out + torch.randn(out.shape, dtype=out.dtype, generator=generator) * (s.noise * s.clip)
        keep = attention_mask.to(torch.bool).unsqueeze(-1)
        return torch.where(keep, out, hidden)

    def backward(self, part: torch.nn.Module, batch: dict[str, torch.Tensor], hidden: torch.Tensor,
                 grad: torch.Tensor) -> None:
        """Backpropagate the server's gradient at the cut, plus NoPeek's term when it is on."""
        if not self.settings.nopeek:
            hidden.backward(grad.to(hidden.dtype))
            return
        with torch.no_grad():  # X: the raw token embeddings (no adapter on them), the input NoPeek decorrelates from
            x = part.base.get_input_embeddings()(batch["input_ids"])
        keep = batch["attention_mask"].to(torch.bool)
        xs, zs = x[keep][:NOPEEK_MAX_TOKENS], hidden[keep][:NOPEEK_MAX_TOKENS]
        penalty = self.settings.nopeek * distance_correlation(xs, zs)
        ((hidden * grad.to(hidden.dtype)).sum() + penalty).backward()


def gaussian_epsilon(noise: float, tokens: int, releases: int, delta: float) -> float:
    """The (epsilon, delta) of releasing one example's clipped-and-noised activations `releases` times, with
    respect to replacing that example by any other of `tokens` tokens.

    Each token row has L2 sensitivity 2C (two vectors of norm <= C), so the sequence has sensitivity 2C*sqrt(T)
    (attention makes every row depend on the whole prefix, so every row can change). With noise std sigma*C the
    Gaussian mechanism is rho-zCDP with rho = (2 sqrt(T))^2 / (2 sigma^2) = 2T/sigma^2 (Bun & Steinke 2016,
    Prop. 1.6); k releases compose to k*rho (Lemma 2.3), and rho-zCDP implies (rho + 2 sqrt(rho ln(1/delta)),
    delta)-DP (Prop. 1.3). No subsampling amplification is claimed: every example is sent each epoch."""
    if noise <= 0:
        return math.inf
    rho = releases * 2.0 * tokens / noise ** 2
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))
