"""Decode and validate a client's step frame against what was negotiated at Join."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.loss import IGNORE_INDEX
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
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


def _int_tensor(msg, name: str, shape: tuple[int, int], limits: FrameLimits) -> torch.Tensor:
    if not msg.ByteSize():
        raise WireError(f"{name} is missing")
    t = decode_tensor(msg, name=name, max_elements=limits.max_batch * limits.max_seq_len)
    if t.dtype not in _INT_DTYPES:
        raise WireError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise WireError(f"{name} has shape {list(t.shape)}, expected {list(shape)} (batch, seq) like hidden")
    return t.to(torch.int64)


def decode_step(frame: spb.StepForward, limits: FrameLimits, codec: int | None = None, client_id: str = "") -> Step:
    """Decode a StepForward of `client_id` (hidden in `codec`, the one negotiated at Join, when given) into the
    engine's step; raise WireError naming the first problem found."""
    if not frame.hidden.ByteSize():
        raise WireError("hidden is missing")
    hidden = decode_tensor(frame.hidden, name="hidden",
                           max_elements=limits.max_batch * limits.max_seq_len * limits.hidden_size)
    if not hidden.is_floating_point():
        raise WireError(f"hidden must be a float tensor, got {hidden.dtype}")
    if codec is not None and (frame.hidden.codec or tpb.CODEC_RAW) != (codec or tpb.CODEC_RAW):
        raise WireError(f"hidden is encoded as {codec_name(frame.hidden.codec)}, but {codec_name(codec)} was "
                        "negotiated at Join")
    if hidden.dim() != 3 or hidden.shape[-1] != limits.hidden_size:
        raise WireError(f"hidden has shape {list(hidden.shape)}, expected (batch, seq, {limits.hidden_size})")
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
    labels = _int_tensor(frame.labels, "labels", (batch, seq), limits)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= limits.vocab_size))
    if bad.any():
        raise WireError(f"labels must be {IGNORE_INDEX} or in [0, {limits.vocab_size}); "
                        f"got {int(labels[bad][0])}")
    return Step(client_id, frame.step, hidden.float(), mask, positions, labels)
