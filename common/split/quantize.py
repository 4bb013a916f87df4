"""A quantized frozen base under float32 LoRA: the client's embeddings and block weights in int8, its adapters
trained in float32 on top.

Only frozen `nn.Linear` and `nn.Embedding` weights are quantized (Llama-style families: every projection and
the embeddings; GPT-2: its embeddings, its blocks being `Conv1D`). LoRA's own layers and norms stay as they are.
The checkpoint on disk is untouched, so the fingerprint still identifies it. int8 is this module's own: one
symmetric scale per row (`int8_rows`); an `Int8Linear` keeps only its int8 weight for the backward (torchao's CPU
int8 saved a float copy of every weight for it: the float base was resident again in each step), and an
`Int8Embedding` dequantizes only the rows a lookup gathers. `load_segment` quantizes while it reads the
checkpoint, one module at a time and each weight in chunks of rows (`Rows`, `CheckpointIndex.read_rows`), so no
float copy of a whole weight, the embedding table included, is ever resident.
4-bit on the CPU: torchao's one CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`, behind its prototype
`Int4OpaqueTensor`) computes the forward only, it has no derivative, and a client backpropagates through its frozen
blocks to train their adapters; torchao's other int4 layouts need a CUDA device. So `int4` is refused on the CPU
with that reason (tests/test_quantization.py checks that the kernel still has no backward).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "int4")
INSTALL_HINT = "pip install 'splitlora[quantization]' (torchao)"


class QuantizationError(ValueError):
    """A quantization that cannot be applied here; the message says why."""


def _frozen_weight(module: nn.Module, name: str) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) and not isinstance(module, Int8Linear) and \
        "lora_" not in name and not module.weight.requires_grad


def check_quantization(mode: str, device: str = "cpu") -> None:
    """Raise QuantizationError when `mode` cannot run on `device` here (unknown, int4 on the CPU, no torchao)."""
    if mode not in QUANTIZATIONS:
        raise QuantizationError(f"quantization {mode!r} is not one of {', '.join(QUANTIZATIONS)}")
    if mode == "int4" and not str(device).startswith("cuda"):
        raise QuantizationError("int4: torchao's CPU 4-bit kernel (aten._weight_int4pack_mm_for_cpu) has no "
                                "backward, which training through the client's frozen blocks needs; its other "
                                "4-bit layouts need a CUDA device; on the CPU use int8")
    if mode == "int4" and importlib.util.find_spec("torchao") is None:
        raise QuantizationError(f"quantization {mode} needs torchao: {INSTALL_HINT}")


@dataclass(frozen=True)
class Rows:
    """A 2-D weight given by ranges of rows: `read(a, b)` returns rows [a, b) in `dtype` (e.g. straight from a
    checkpoint, so that the whole float tensor is never resident)."""

    read: Callable[[int, int], torch.Tensor]
    shape: tuple[int, int]
    dtype: torch.dtype

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Rows":
        """The rows of a tensor in memory."""
        return cls(lambda a, b: weight[a:b], tuple(weight.shape), weight.dtype)


def int8_rows(weight: torch.Tensor | Rows, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [rows, cols] as int8 with one symmetric scale per row (max |w| / 127), computed in chunks of rows
    (read one chunk at a time when `weight` is `Rows`) so that no float temporary of the whole tensor is made."""
    rows = weight if isinstance(weight, Rows) else Rows.of(weight)
    qweight = torch.empty(rows.shape, dtype=torch.int8)
    scale = torch.empty(rows.shape[0], dtype=rows.dtype)
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = rows.read(start, min(start + rows_per_chunk, rows.shape[0])).detach().float()
        s = chunk.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).eps) / 127
        qweight[start:start + rows_per_chunk] = torch.round(chunk / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[start:start + rows_per_chunk] = s.to(rows.dtype)
        del chunk, s
    return qweight, scale


class Int8Embedding(nn.Module):
    """A frozen embedding table in int8 (`int8_rows`); a lookup gathers int8 rows and dequantizes only those."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def quantize(cls, weight: torch.Tensor | Rows, padding_idx: int | None = None,
                 rows_per_chunk: int = 4096) -> "Int8Embedding":
        """The table `weight` (a tensor, or `Rows` read in chunks) quantized with `int8_rows`."""
        return cls(*int8_rows(weight, rows_per_chunk), padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


class _Int8MatMul(torch.autograd.Function):
    """x @ (qweight * scale).T, saving only the int8 weight for the backward (never a float copy of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        return (x @ qweight.t().to(x.dtype)) * scale.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        qweight, scale = ctx.saved_tensors
        return (grad * scale.to(grad.dtype)) @ qweight.to(grad.dtype), None, None


class Int8Linear(nn.Linear):
    """A frozen `nn.Linear` with its weight in int8 (`int8_rows`, one scale per output feature); gradients flow to
    its input only. A subclass of `nn.Linear`, so peft puts LoRA on it as on any linear layer."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = bias

    @classmethod
    def quantize(cls, weight: torch.Tensor | Rows, bias: torch.Tensor | None = None) -> "Int8Linear":
        """A linear layer of `weight` (a tensor, or `Rows` read in chunks) quantized with `int8_rows`."""
        return cls(*int8_rows(weight), bias)

    @property
    def weight(self) -> torch.Tensor:
        """The int8 weight (peft reads a linear layer's `weight` for its device and dtype)."""
        return self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Int8MatMul.apply(x, self.qweight, self.scale)
        return out if self.bias is None else out + self.bias


def quantizes_by_rows(module: nn.Module, name: str, mode: str) -> bool:
    """True when `quantize_module` quantizes this module with the project's int8, which can read its weight in
    ranges of rows (`Rows`) instead of from a float weight already in memory."""
    return mode == "int8" and type(module) in (nn.Linear, nn.Embedding) and "lora_" not in name


def quantize_module(model: nn.Module, name: str, mode: str, rows: Rows | None = None) -> bool:
    """Quantize the frozen Linear/Embedding `name` of `model` in place (`int8`: replaced by `Int8Linear` /
    `Int8Embedding`; `int4`: torchao); False if it is not one. With `rows` (only where `quantizes_by_rows`), the
    weight is read from them in chunks and the module's own weight is never touched."""
    module = model.get_submodule(name)
    if rows is None and not _frozen_weight(module, name):
        return False
    if quantizes_by_rows(module, name, mode):  # subclasses (Gemma's scaled embedding): torchao
        weight = rows if rows is not None else Rows.of(module.weight)
        parent, _, child = name.rpartition(".")
        new = Int8Linear.quantize(weight, module.bias) if isinstance(module, nn.Linear) \
            else Int8Embedding.quantize(weight, module.padding_idx)
        setattr(model.get_submodule(parent), child, new)
        return True
    if rows is not None:
        raise QuantizationError(f"{name}: only the int8 of nn.Linear / nn.Embedding reads its weight in rows")
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
