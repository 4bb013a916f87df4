"""A quantized frozen base under float32 LoRA: the client's embeddings and block weights in int8 (torchao's
weight-only int8, which has CPU kernels), its adapters trained in float32 on top.

Only frozen `nn.Linear` and `nn.Embedding` weights are quantized (Llama-style families: every projection and
the embeddings; GPT-2: its embeddings, its blocks being `Conv1D`, which torchao does not quantize). LoRA's own
layers and norms stay as they are. The checkpoint on disk is untouched, so the fingerprint still identifies it.
A plain int8 embedding table becomes an `Int8Embedding`, which dequantizes only the rows a lookup gathers
(torchao's would dequantize the whole table for every lookup); `load_segment` quantizes while it loads, one module
at a time, so the float32 base is never resident at once.
4-bit on the CPU: torchao's one CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`, behind its prototype
`Int4OpaqueTensor`) computes the forward only, it has no derivative, and a client backpropagates through its frozen
blocks to train their adapters; torchao's other int4 layouts need a CUDA device. So `int4` is refused on the CPU
with that reason (tests/test_quantization.py checks that the kernel still has no backward).
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "int4")
INSTALL_HINT = "pip install 'splitlora[quantization]' (torchao)"


class QuantizationError(ValueError):
    """A quantization that cannot be applied here; the message says why."""


def _frozen_weight(module: nn.Module, name: str) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) and "lora_" not in name and \
        not module.weight.requires_grad


def check_quantization(mode: str, device: str = "cpu") -> None:
    """Raise QuantizationError when `mode` cannot run on `device` here (unknown, int4 on the CPU, no torchao)."""
    if mode not in QUANTIZATIONS:
        raise QuantizationError(f"quantization {mode!r} is not one of {', '.join(QUANTIZATIONS)}")
    if mode == "int4" and not str(device).startswith("cuda"):
        raise QuantizationError("int4: torchao's CPU 4-bit kernel (aten._weight_int4pack_mm_for_cpu) has no "
                                "backward, which training through the client's frozen blocks needs; its other "
                                "4-bit layouts need a CUDA device; on the CPU use int8")
    if mode != "none" and importlib.util.find_spec("torchao") is None:
        raise QuantizationError(f"quantization {mode} needs torchao: {INSTALL_HINT}")


class Int8Embedding(nn.Module):
    """A frozen embedding table in int8 with one scale per row (symmetric, as torchao's int8 weight-only); a lookup
    gathers int8 rows and dequantizes only those."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None, rows_per_chunk: int = 4096) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        qweight = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(weight.shape[0], dtype=weight.dtype)
        for start in range(0, weight.shape[0], rows_per_chunk):  # chunks: no float temporary of the whole table
            rows = weight[start:start + rows_per_chunk].detach().float()
            s = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).eps) / 127
            qweight[start:start + rows_per_chunk] = torch.round(rows / s[:, None]).clamp(-128, 127).to(torch.int8)
            scale[start:start + rows_per_chunk] = s.to(weight.dtype)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


def quantize_module(model: nn.Module, name: str, mode: str) -> bool:
    """Quantize the frozen Linear/Embedding `name` of `model` in place (`int8`/`int4`, checked); False if it is
    not one."""
    module = model.get_submodule(name)
    if not _frozen_weight(module, name):
        return False
    if mode == "int8" and type(module) is nn.Embedding:  # subclasses (Gemma's scaled embedding) go to torchao
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8Embedding(module.weight, module.padding_idx))
        return True
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    config = Int8WeightOnlyConfig() if mode == "int8" else Int4WeightOnlyConfig(group_size=128)
    quantize_(module, config, filter_fn=lambda m, fqn: m is module)
    return True


def quantize_frozen(model: nn.Module, mode: str, device: str = "cpu") -> int:
    """Quantize the frozen Linear/Embedding weights of `model` in place (`none`: nothing); return how many."""
    check_quantization(mode, device)
    if mode == "none":
        return 0
    chosen = [name for name, module in model.named_modules() if _frozen_weight(module, name)]
    return sum(quantize_module(model, name, mode) for name in chosen)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized tensors counted by their own storage)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        for inner in _storages(t):
            key = inner.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += inner.untyped_storage().nbytes()
    return total


def _storages(t):
    names, _ = t.__tensor_flatten__() if hasattr(t, "__tensor_flatten__") else ([], None)
    if not names:
        return [t]
    return [s for name in names for s in _storages(getattr(t, name))]
