"""Model split: one module per model family behind one interface, and the loader that builds one side."""
from __future__ import annotations

from common.split.base import ModelFamily, UnsupportedModelError
from common.split.gpt2 import GPT2Family
from common.split.gpt_neox import GPTNeoXFamily
from common.split.decoder_families import DECODER_FAMILIES

FAMILIES: tuple[ModelFamily, ...] = (GPT2Family(), GPTNeoXFamily(), *DECODER_FAMILIES)

__all__ = ["FAMILIES", "ModelFamily", "UnsupportedModelError", "family_for", "supported_model_types"]


def supported_model_types() -> list[str]:
    """Every `model_type` a split is implemented for."""
    return sorted(t for fam in FAMILIES for t in fam.model_types)


def family_for(model_type: str) -> ModelFamily:
    """The split implementation for a Hugging Face `model_type`, or a clear error listing the supported ones."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}")
