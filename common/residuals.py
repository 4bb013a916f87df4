"""FedEx-LoRA residuals: how they are keyed, folded into frozen base weights, and exported exactly.

The `fedex` strategy sends, next to the averaged adapter, one dense residual per LoRA module: the cumulative
sum over rounds of mean(B_i·A_i) - mean(B)·mean(A), keyed `<module>.fedex_residual` and oriented like B·A
(out x in), unscaled. A model that holds it computes W0 + scaling·(B·A + R), the exact average of what the
clients trained. Because the residual is cumulative, folding it is idempotent (`ResidualFolder` keeps W0):
a resumed client or server that loads a round's global adapter again ends in the same weights.
"""
from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel

RESIDUAL = ".fedex_residual"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
PEFT_PREFIX = "base_model.model."

AdapterState = dict[str, torch.Tensor]


def lora_pairs(state: AdapterState) -> dict[str, tuple[str, str]]:
    """module prefix -> (lora_A key, lora_B key), for every module of `state` that has both."""
    return {k[:-len(A_SUFFIX)]: (k, k[:-len(A_SUFFIX)] + B_SUFFIX) for k in sorted(state)
            if k.endswith(A_SUFFIX) and k[:-len(A_SUFFIX)] + B_SUFFIX in state}


def residual_key(prefix: str) -> str:
    """The key of a module's residual."""
    return prefix + RESIDUAL


def split_residuals(state: AdapterState) -> tuple[AdapterState, AdapterState]:
    """(the adapter tensors, the residuals) of a global state."""
    adapter = {k: v for k, v in state.items() if not k.endswith(RESIDUAL)}
    return adapter, {k: v for k, v in state.items() if k.endswith(RESIDUAL)}


def effective_products(state: AdapterState) -> dict[str, torch.Tensor]:
    """module prefix -> B·A + R in float64: the update (before LoRA scaling) a state applies to each module."""
    out = {}
    for prefix, (a, b) in lora_pairs(state).items():
        prod = state[b].double() @ state[a].double()
        res = state.get(residual_key(prefix))
        out[prefix] = prod + res.double() if res is not None else prod
    return out


class ResidualFolder:
    """Folds residuals into a peft model's frozen base weights: W = W0 + scaling·R (transposed for layers stored
    fan-in-fan-out, as GPT-2's Conv1D). Keeps W0 of every folded module, so folding is idempotent."""

    def __init__(self, model: PeftModel, adapter_name: str = "default") -> None:
        self.model, self.adapter_name = model, adapter_name
        self.originals: dict[str, torch.Tensor] = {}
        self.residuals: AdapterState = {}

    def fold(self, residuals: AdapterState) -> None:
        """Make the base weights W0 + scaling·R for every residual given (cumulative residuals, not increments)."""
        if not residuals:
            return
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for key, res in residuals.items():
                prefix = key[:-len(RESIDUAL)]
                layer = modules.get(prefix)
                if layer is None or not hasattr(layer, "base_layer"):
                    raise ValueError(f"residual {key} names no LoRA module of this model part")
                weight = layer.get_base_layer().weight
                expected = weight.shape[::-1] if layer.fan_in_fan_out else weight.shape
                if tuple(res.shape) != tuple(expected):
                    raise ValueError(f"residual {key} has shape {tuple(res.shape)}, expected {tuple(expected)}")
                w0 = self.originals.setdefault(prefix, weight.detach().clone())
                delta = res.to(torch.float32) * layer.scaling[self.adapter_name]
                weight.copy_((w0.float() + (delta.T if layer.fan_in_fan_out else delta)).to(weight.dtype))
        self.residuals = {k: v.detach().clone() for k, v in residuals.items()}

    def reset(self) -> None:
        """Put every folded module's W0 back and forget the residuals."""
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for prefix, w0 in self.originals.items():
                modules[prefix].get_base_layer().weight.copy_(w0)
        self.residuals = {}


def expand_residuals(state: AdapterState, config: LoraConfig) -> tuple[AdapterState, LoraConfig]:
    """A standard PEFT adapter reproducing `state`'s adapter plus residuals exactly: every module with a residual
    R gets rank r + min(out, in) by concatenation, B' = [B, R], A' = [A; I] (or B' = [B, I], A' = [A; R] when
    out < in), so B'·A' = B·A + R with no approximation; rank_pattern/alpha_pattern keep its scaling."""
    adapter, residuals = split_residuals(state)
    if not residuals:
        return adapter, config
    out, ranks, alphas = dict(adapter), dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    scaling = config.lora_alpha / config.r
    for key, res in sorted(residuals.items()):
        prefix = key[:-len(RESIDUAL)]
        a, b = adapter[prefix + A_SUFFIX].float(), adapter[prefix + B_SUFFIX].float()
        n_out, n_in = res.shape
        if n_in <= n_out:
            out[prefix + A_SUFFIX] = torch.cat([a, torch.eye(n_in)])
            out[prefix + B_SUFFIX] = torch.cat([b, res.float()], dim=1)
        else:
            out[prefix + A_SUFFIX] = torch.cat([a, res.float()])
            out[prefix + B_SUFFIX] = torch.cat([b, torch.eye(n_out)], dim=1)
        rank = a.shape[0] + min(n_out, n_in)
        name = prefix.removeprefix(PEFT_PREFIX)
        ranks[name], alphas[name] = rank, scaling * rank
    expanded = LoraConfig(**{**config.to_dict(), "rank_pattern": ranks, "alpha_pattern": alphas})
    return out, expanded
