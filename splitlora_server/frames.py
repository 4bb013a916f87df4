"""Decode and validate a client's step frame against what was negotiated at Join."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.loss import IGNORE_INDEX, target_tokens
from common.router_wire import decode_stats
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.split.router import RouterStats
from common.wire import WireError, codec_name, decode_tensor
from splitlora_server.engine.jobs import Step

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


@dataclass(frozen=True)
class FrameLimits:
    """What a step frame may contain."""

    hidden_size: int
    vocab_size: int
    max_batch: int
    max_seq_len: int
    max_positions: int
    num_experts: int = 0  # > 0: a mixture-of-experts model whose steps carry router statistics


_WIRE_BYTES = {tpb.CODEC_FLOAT16: 2, tpb.CODEC_BFLOAT16: 2, tpb.CODEC_INT8: 1}  # per value; raw: up to 4
FRAME_OVERHEAD_BYTES = 16 << 10  # protobuf envelopes, shapes and the step header, generously


def max_frame_bytes(limits: FrameLimits, codec: int) -> int:
    """The largest valid step frame in `codec` (the schedule's batch and sequence length, the model's hidden size):
    a frame sent in pieces may announce no more than this."""
    tokens = limits.max_batch * limits.max_seq_len
    hidden = tokens * limits.hidden_size * _WIRE_BYTES.get(codec, 4)
    scales = tokens * 4 if codec == tpb.CODEC_INT8 else 0
    return hidden + scales + 3 * tokens * 8 + FRAME_OVERHEAD_BYTES  # mask, positions, labels: up to int64


def _int_tensor(msg, name: str, shape: tuple[int, int], limits: FrameLimits) -> torch.Tensor:
    if not msg.ByteSize():
        raise WireError(f"{name} is missing")
    t = decode_tensor(msg, name=name, max_elements=limits.max_batch * limits.max_seq_len)
    if t.dtype not in _INT_DTYPES:
        raise WireError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise WireError(f"{name} has shape {list(t.shape)}, expected {list(shape)} (batch, seq) like hidden")
    return t.to(torch.int64)


def decode_activations(msg: tpb.Tensor, name: str, limits: FrameLimits, codec: int | None) -> torch.Tensor:
    """A (batch, seq, hidden) float tensor of a frame, in the codec negotiated at Join (when given)."""
    if not msg.ByteSize():
        raise WireError(f"{name} is missing")
    t = decode_tensor(msg, name=name, max_elements=limits.max_batch * limits.max_seq_len * limits.hidden_size,
                      float32=True)
    if not t.is_floating_point():
        raise WireError(f"{name} must be a float tensor, got {t.dtype}")
    if codec is not None and (msg.codec or tpb.CODEC_RAW) != (codec or tpb.CODEC_RAW):
        raise WireError(f"{name} is encoded as {codec_name(msg.codec)}, but {codec_name(codec)} was "
                        "negotiated at Join")
    if t.dim() != 3 or t.shape[-1] != limits.hidden_size:
        raise WireError(f"{name} has shape {list(t.shape)}, expected (batch, seq, {limits.hidden_size})")
    return t


def decode_step(frame: spb.StepForward, limits: FrameLimits, codec: int | None = None, client_id: str = "",
                u_shape: bool = False) -> Step:
    """Decode a StepForward of `client_id` (hidden in `codec`, the one negotiated at Join, when given) into the
    engine's step; raise WireError naming the first problem found. In `u_shape` mode a frame carrying labels is
    refused (labels stay on the client); in standard mode they are required."""
    hidden = decode_activations(frame.hidden, "hidden", limits, codec)
    batch, seq = int(hidden.shape[0]), int(hidden.shape[1])
    if not 1 <= batch <= limits.max_batch:
        raise WireError(f"batch size {batch} is outside [1, {limits.max_batch}] (the server's --batch-size)")
    if not 1 <= seq <= limits.max_seq_len:
        raise WireError(f"sequence length {seq} is outside [1, {limits.max_seq_len}] (the server's --max-seq-len)")
    mask = _int_tensor(frame.attention_mask, "attention_mask", (batch, seq), limits)
    if not ((mask == 0) | (mask == 1)).all():
        raise WireError("attention_mask may only hold 0 and 1")
    if not mask.any(dim=1).all():
        raise WireError("attention_mask has a row with no tokens")
    positions = _int_tensor(frame.position_ids, "position_ids", (batch, seq), limits)
    if positions.min() < 0 or positions.max() >= limits.max_positions:
        raise WireError(f"position_ids must be in [0, {limits.max_positions})")
    count = max(frame.micro_count, 1)
    if frame.micro >= count:
        raise WireError(f"micro-batch {frame.micro} of a step sent in {count}")
    if u_shape:
        if frame.HasField("labels"):
            raise WireError("labels are refused in u-shape mode: the labels, logits and loss stay on the client "
                            "(a standard-mode client? the server runs --split-mode u-shape)")
        if frame.step_tokens:
            raise WireError("step_tokens is refused in u-shape mode: it counts the labels' target tokens, which "
                            "stay on the client (the client divides each micro-batch's loss itself)")
        if frame.HasField("router"):
            raise WireError("router statistics are refused in u-shape mode (the router's auxiliary loss is not "
                            "supported there)")
        return Step(client_id, frame.step, hidden, mask, positions, None, None, frame.micro, count)
    if not frame.HasField("labels"):
        raise WireError("labels is missing (a u-shape client? the server runs --split-mode standard)")
    labels = _int_tensor(frame.labels, "labels", (batch, seq), limits)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= limits.vocab_size))
    if bad.any():
        raise WireError(f"labels must be {IGNORE_INDEX} or in [0, {limits.vocab_size}); "
                        f"got {int(labels[bad][0])}")
    tokens = target_tokens(labels)
    if count > 1 and frame.step_tokens < max(tokens, 1):
        raise WireError(f"step_tokens {frame.step_tokens} is below this micro-batch's {tokens} target tokens")
    router = _router(frame, limits)
    if router is not None and count > 1:
        raise WireError("a step with router statistics cannot be sent in micro-batches: the router's auxiliary loss "
                        "is not a sum over rows (use --micro-batches 1 with this mixture-of-experts model)")
    return Step(client_id, frame.step, hidden, mask, positions, labels, router, frame.micro, count, frame.step_tokens)


def _router(frame: spb.StepForward, limits: FrameLimits) -> RouterStats | None:
    """The client's router statistics: required exactly when the model's router auxiliary loss is on."""
    if not frame.HasField("router"):
        if limits.num_experts:
            raise WireError("router statistics are missing: this mixture-of-experts model trains with the router's "
                            "auxiliary loss (output_router_logits), which needs those of the client's layers")
        return None
    if not limits.num_experts:
        raise WireError("router statistics were sent, but this model has no router auxiliary loss")
    return decode_stats(frame.router, limits.num_experts)
