"""The LoRA recipe both sides share (`LoraSettings`), and where its targets are on the whole model and on each side.

Targets are matched as peft matches them (a module's full name, or its last components). `all-linear` is peft's
shorthand: every linear layer except the output layer, resolved on the whole model exactly as peft resolves it.
A target may exist on one side only (the embeddings on the client, the head on the server): LoRA goes where the
module is. A target present on neither side is an error naming it.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from accelerate import init_empty_weights
from peft import LoraConfig
from peft.tuners.tuners_utils import (_find_minimal_target_modules, _maybe_include_all_linear_layers,
                                     check_target_module_exists)
from peft.utils.constants import MIN_TARGET_MODULES_FOR_OPTIMIZATION
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from common.split.base import ModelFamily

ALL_LINEAR = "all-linear"
TASK_TYPE = "CAUSAL_LM"


class LoraTargetError(ValueError):
    """A LoRA target names no module of the model (or a side would have no adapted module)."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; `targets` empty means the family's defaults, `("all-linear",)` peft's shorthand.
    `rslora` scales by alpha / sqrt(r) instead of alpha / r; `dora` adds DoRA's weight-decomposed magnitude."""

    r: int = 4
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = field(default_factory=tuple)
    rslora: bool = False
    dora: bool = False

    def resolved(self, family: ModelFamily) -> "LoraSettings":
        """These settings with the family's default targets filled in."""
        return replace(self, targets=tuple(self.targets) or family.default_lora_targets)

    def peft_config(self, family: ModelFamily) -> LoraConfig:
        """The peft LoraConfig of these settings (as a user would write it for the unsplit model)."""
        s = self.resolved(family)
        if ALL_LINEAR in s.targets and len(s.targets) > 1:
            raise LoraTargetError(f"LoRA targets: {ALL_LINEAR!r} stands alone, got {list(s.targets)}")
        targets: str | list[str] = ALL_LINEAR if s.targets == (ALL_LINEAR,) else list(s.targets)
        return LoraConfig(task_type=TASK_TYPE, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                          target_modules=targets, fan_in_fan_out=family.fan_in_fan_out, bias="none",
                          use_rslora=s.rslora, use_dora=s.dora)

    def sha256(self, family: ModelFamily) -> str:
        """Hash of the resolved settings, for the handshake fingerprint."""
        data = asdict(self.resolved(family))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def whole_model(config: Any) -> nn.Module:
    """The unsplit model with its parameters on the meta device (nothing is read or allocated)."""
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def whole_model_lora_config(settings: LoraSettings, family: ModelFamily, config: Any) -> LoraConfig:
    """The LoraConfig peft itself holds (and saves) for the unsplit model after injecting these settings."""
    lora, model = _resolved(settings, family, config)
    return _fan_in_fan_out_as_peft_leaves_it(lora, model)


def _resolved(settings: LoraSettings, family: ModelFamily, config: Any) -> tuple[LoraConfig, nn.Module]:
    """These settings' LoraConfig on the whole model: `all-linear` resolved to module names (condensed as peft
    condenses them); every named target checked to exist somewhere (an error names those that don't)."""
    lora = settings.peft_config(family)
    model = whole_model(config)
    names = [n for n, _ in model.named_modules()]
    if lora.target_modules == ALL_LINEAR:
        return _condensed(_maybe_include_all_linear_layers(lora, model), names), model
    missing = sorted(t for t, one in ((t, LoraConfig(target_modules=[t])) for t in lora.target_modules)
                     if not any(check_target_module_exists(one, n) for n in names))
    if missing:
        raise LoraTargetError(f"LoRA targets {missing} name no module of this {family.name} model (neither the "
                              "client part nor the server part has one)")
    return lora, model


def _fan_in_fan_out_as_peft_leaves_it(lora: LoraConfig, model: nn.Module) -> LoraConfig:
    """peft flips `fan_in_fan_out` in the config itself at every adapted layer of the other kind (nn.Linear wants
    it off, Conv1D on), in module order; the saved config keeps the last flip (e.g. GPT-2 with `lm_head`)."""
    for name, module in model.named_modules():
        if check_target_module_exists(lora, name):
            if isinstance(module, nn.Linear) and lora.fan_in_fan_out:
                lora.fan_in_fan_out = False
            elif isinstance(module, Conv1D) and not lora.fan_in_fan_out:
                lora.fan_in_fan_out = True
    return lora


def _condensed(lora: LoraConfig, names: list[str]) -> LoraConfig:
    """peft's own condensing of a long list of module names into the suffixes that single them out (as in
    `BaseTuner.inject_adapter`), so the saved config is the one peft writes."""
    targets = lora.target_modules
    if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        suffixes = tuple("." + t for t in targets)
        others = [n for n in names if n not in targets and not n.endswith(suffixes)]
        condensed = _find_minimal_target_modules(targets, others)
        if len(condensed) < len(targets):
            lora.target_modules = condensed
    return lora


def side_lora_config(settings: LoraSettings, family: ModelFamily, config: Any, part: nn.Module,
                     what: str) -> LoraConfig:
    """The LoraConfig for one part's pruned model (`what` names the part in errors): the whole model's targets
    (those in this part match)."""
    lora, _ = _resolved(settings, family, config)
    names = [n for n, _ in part.named_modules()]
    if not any(check_target_module_exists(lora, n) for n in names):
        raise LoraTargetError(f"LoRA targets {sorted(lora.target_modules)} name no module of the {what}: each part "
                              "needs at least one adapted module")
    return lora
