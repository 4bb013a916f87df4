"""A quantized frozen base on the client (torchao int8 weight-only, LoRA in float32 on top): less memory, close
outputs, LoRA gradients, and training through real gRPC with a loss close to the unquantized client's."""
from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch

from common.config.engine import ConfigError
from common.split.parts import LoraSettings, SplitPart
from common.split.quantize import Int8Embedding, Int8Linear, QuantizationError, quantize_frozen, weight_bytes
from splitlora_client.options import TrainConfig
from splitlora_client.trainer import client_parts
from tests.support.families import VOCAB, checkpoint_dir
from tests.support.solo import solo_run


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids), torch.arange(9).repeat(2, 1)


def test_int8_client_part_holds_less_and_computes_close_with_float32_lora():
    part = SplitPart(checkpoint_dir("llama"), "client", 2, LoraSettings(4, 8, 0.0, ()))
    full = weight_bytes(part)
    reference = part(*_inputs()).detach()
    assert quantize_frozen(part, "int8") == 15  # the embeddings and 7 projections in each of 2 blocks
    assert weight_bytes(part) < 0.4 * full
    hidden = part(*_inputs())
    assert (hidden - reference).abs().max() < 0.02 * reference.abs().max()
    hidden.sum().backward()
    lora = {n: p for n, p in part.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 and p.grad is not None for n, p in lora.items())


def test_int4_and_unknown_modes_are_refused_with_the_reason():
    with pytest.raises(QuantizationError, match="has no backward"):
        quantize_frozen(torch.nn.Linear(4, 4), "int4")
    with pytest.raises(QuantizationError, match="not one of none, int8, int4"):
        quantize_frozen(torch.nn.Linear(4, 4), "fp3")
    with pytest.raises(ConfigError, match="client_quantization: int4"):
        TrainConfig(insecure=True, client_quantization="int4").validate()


def _losses(out: Path) -> list[float]:
    lines = (out / "solo" / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("event") == "step"]


def test_an_int8_client_trains_through_the_server_close_to_float32(tmp_path: Path, builtin_model_dir: Path):
    """The same run with the client's embeddings in int8 (the built-in GPT-2's blocks are Conv1D, which torchao
    leaves alone): the server accepts its fingerprint, it trains, and every step's loss is close."""
    exact_client, _ = solo_run(tmp_path / "none", seed=5)
    int8_client, _ = solo_run(tmp_path / "int8", seed=5, client_quantization="int8")
    plain, quantized = _losses(tmp_path / "none"), _losses(tmp_path / "int8")
    assert len(plain) == len(quantized) == 6
    assert all(abs(q - p) < 0.01 * p for p, q in zip(plain, quantized))
    assert quantized[-1] < quantized[0]  # it learns
    assert any(not torch.equal(exact_client[k], int8_client[k]) for k in exact_client)  # it did run quantized


def test_a_u_shape_int8_client_trains_through_the_server_close_to_float32(tmp_path: Path, builtin_model_dir: Path):
    """--split-mode u-shape --top-blocks 1 with the client's base in int8: it trains through real gRPC and each
    step's loss is within 1 % of the float32 u-shape client's. The tolerance: int8 with one scale per row moves
    each quantized weight by at most half a step (max |row| / 254); here those are the embeddings on the bottom and
    the head on the top (the built-in GPT-2's blocks are Conv1D), so the logits, and a loss of several nats, move
    by far less than 1 % over six steps, while a wrong dequantization or a float head would not stay that close
    and equal at once."""
    u_shape = {"split_mode": "u-shape", "top_blocks": 1}
    exact_client, _ = solo_run(tmp_path / "none", seed=5, serve=u_shape)
    int8_client, _ = solo_run(tmp_path / "int8", seed=5, serve=u_shape, client_quantization="int8")
    plain, quantized = _losses(tmp_path / "none"), _losses(tmp_path / "int8")
    assert len(plain) == len(quantized) == 6
    assert all(abs(q - p) < 0.01 * p for p, q in zip(plain, quantized))
    assert quantized != plain and quantized[-1] < quantized[0]  # it ran quantized, and it learns
    assert any(".h.5." in k for k in int8_client) and set(int8_client) == set(exact_client)  # the top's adapter


def test_a_u_shape_client_quantizes_its_top_part_as_its_bottom():
    """The u-shape client's top part (its last block, final norm and head) is read into int8 as the bottom is:
    no frozen nn.Linear / nn.Embedding is left in float in either part."""
    cfg = TrainConfig(insecure=True, split_layer=1, split_mode="u-shape", top_blocks=1, client_quantization="int8")
    bottom, top = client_parts(cfg, checkpoint_dir("llama"), LoraSettings(4, 8, 0.0, ()), seed=0)
    for part, quantized in ((bottom, 8), (top, 8)):  # embeddings + 7 projections; 7 projections + head
        modules = dict(part.named_modules())
        assert sum(isinstance(m, (Int8Linear, Int8Embedding)) for m in modules.values()) == quantized
        assert not [n for n, m in modules.items() if type(m) in (torch.nn.Linear, torch.nn.Embedding)
                    and "lora_" not in n]
    assert isinstance(top.peft.base_model.model.lm_head, Int8Linear)


def test_an_int8_client_with_gradient_checkpointing_computes_the_same_step():
    """--gradient-checkpointing on the client (its low-memory companion to int8) recomputes each block in the
    backward with the same dropout masks: the same output and the same LoRA gradients."""
    grads = []
    for recompute in (False, True):
        cfg = TrainConfig(insecure=True, split_layer=2, client_quantization="int8", gradient_checkpointing=recompute)
        part, _ = client_parts(cfg, checkpoint_dir("llama"), LoraSettings(4, 8, 0.1, ()), seed=0)
        part.train()
        torch.manual_seed(7)  # dropout
        kept: list[int] = []  # bytes the forward keeps for the backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.nbytes) or t, lambda t: t):
            hidden = part(*_inputs())
        hidden.pow(2).sum().backward()
        grads.append((hidden.detach(), {n: p.grad for n, p in part.named_parameters() if p.requires_grad}, kept))
    (plain, plain_grads, plain_kept), (recomputed, recomputed_grads, recomputed_kept) = grads
    assert sum(recomputed_kept) < sum(plain_kept) / 2  # the blocks' activations are recomputed, not kept
    assert torch.equal(plain, recomputed) and plain_grads.keys() == recomputed_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_the_cpu_int4_kernel_still_has_no_backward():
    """The reason int4 is refused on the CPU: when torchao's CPU int4 linear gains a derivative, this fails and
    `--client-quantization int4` can be enabled on the CPU."""
    pytest.importorskip("torchao")
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    layer = torch.nn.Linear(256, 128).requires_grad_(False)
    quantize_(layer, PrototypeInt4WeightOnlyConfig(group_size=128))
    x = torch.randn(2, 256, requires_grad=True)
    y = layer(x)
    with pytest.raises(RuntimeError, match="derivative for aten::_weight_int4pack_mm_for_cpu is not implemented"):
        y.sum().backward()


def _maps_of(path: Path) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path.resolve()) in line]


def test_a_part_quantized_while_loading_equals_quantizing_after_and_leaves_no_mapping(tmp_path: Path):
    """Quantizing module by module as the checkpoint is read gives the same part (bytes held, outputs) as
    quantizing the loaded float part, and afterwards no mapping of the checkpoint file remains."""
    model_dir = tmp_path / "llama"
    shutil.copytree(checkpoint_dir("llama"), model_dir)  # a path of its own: no other test's part maps it
    lora = LoraSettings(4, 8, 0.0, ())
    after = SplitPart(model_dir, "client", 2, lora)
    assert _maps_of(model_dir / "model.safetensors")  # the float part's weights are the file's memory map
    quantize_frozen(after, "int8")
    reference = after(*_inputs()).detach()
    held_after = weight_bytes(after)
    del after
    gc.collect()
    assert not _maps_of(model_dir / "model.safetensors")
    loaded = SplitPart(model_dir, "client", 2, lora, quantization="int8")
    assert not _maps_of(model_dir / "model.safetensors")
    assert weight_bytes(loaded) == held_after
    assert isinstance(loaded.base.model.embed_tokens, Int8Embedding)
    assert torch.equal(loaded(*_inputs()), reference)


def test_int8_embedding_dequantizes_the_rows_it_gathers_within_half_a_step():
    weight = torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(1))
    table = Int8Embedding.quantize(weight, rows_per_chunk=7)  # chunks that do not divide the rows
    ids = torch.tensor([[0, 5, 95, 5], [17, 94, 1, 2]])
    got, want = table(ids), torch.nn.functional.embedding(ids, weight)
    assert got.shape == want.shape and got.dtype == torch.float32
    step = weight.abs().amax(dim=1) / 127
    assert ((got - want).abs() <= step[ids].unsqueeze(-1) / 2 + 1e-7).all()
    assert table.qweight.dtype == torch.int8 and table.qweight.abs().amax(dim=1).eq(127).all()
    assert torch.equal(table(ids[:, :1]), got[:, :1])  # a row's value does not depend on what else is gathered


def test_int8_linear_keeps_only_int8_for_the_backward_and_its_input_gradient_is_close():
    """torchao's CPU int8 saved a float copy of each weight for the backward; `Int8Linear` saves the int8 one."""
    linear = torch.nn.Linear(64, 48).requires_grad_(False)
    quantized = Int8Linear.quantize(linear.weight, linear.bias)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = quantized(x)
    saved = out.grad_fn.next_functions[0][0].saved_tensors if linear.bias is not None else out.grad_fn.saved_tensors
    assert [t.dtype for t in saved] == [torch.int8, torch.float32] and saved[1].shape == (48,)
    (grad,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().requires_grad_(True)
    reference = torch.nn.functional.linear(x_ref, linear.weight, linear.bias)
    (grad_ref,) = torch.autograd.grad(reference.sum(), x_ref)
    assert (out - reference).abs().max() < 0.02 * reference.abs().max()
    assert (grad - grad_ref).abs().max() < 0.02 * grad_ref.abs().max()
