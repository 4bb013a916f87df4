"""Decode and check generation requests (session steps and scores) against the session and the server's limits."""
from __future__ import annotations

import torch

from common.rpc.splitlora.v1 import generation_pb2 as gpb
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.wire import WireError, decode_tensor
from splitlora_server.engine.jobs import Step
from splitlora_server.frames import FrameLimits, decode_step
from splitlora_server.generation.compute import StepInput
from splitlora_server.generation.sessions import Session

_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
ADAPTERS = {gpb.SERVER_ADAPTER_UNSPECIFIED: "shared", gpb.SERVER_ADAPTER_SHARED: "shared",
            gpb.SERVER_ADAPTER_OWN: "own", gpb.SERVER_ADAPTER_NONE: "none"}
REPLIES = {gpb.REPLY_UNSPECIFIED: "logits", gpb.REPLY_LOGITS: "logits", gpb.REPLY_TOP_K: "top_k",
           gpb.REPLY_HIDDEN: "hidden"}


def _ints(msg, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not msg.ByteSize():
        raise WireError(f"{name} is missing")
    t = decode_tensor(msg, name=name, max_elements=max(1, int(torch.tensor(shape).prod())))
    if t.dtype not in _INTS:
        raise WireError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise WireError(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
    return t.to(torch.int64)


def decode_session_step(msg: gpb.GenerationStep, session: Session, hidden_size: int, max_positions: int,
                        max_batch: int, codecs: set[int]) -> StepInput:
    """The tensors of one step of `session`; raise WireError naming the first problem."""
    if msg.step != session.next_step:
        raise WireError(f"step {msg.step} is out of order: the session expects step {session.next_step}")
    if not msg.hidden.ByteSize():
        raise WireError("hidden is missing")
    if (msg.hidden.codec or 1) not in codecs:
        raise WireError("hidden is encoded in a codec the server does not accept (see its --codecs)")
    limit = max_batch * max(1, session.max_tokens) * hidden_size
    hidden = decode_tensor(msg.hidden, name="hidden", max_elements=limit)
    if not hidden.is_floating_point() or hidden.dim() != 3 or hidden.shape[-1] != hidden_size:
        raise WireError(f"hidden must be a float (rows, new, {hidden_size}) tensor, got {hidden.dtype} "
                        f"{list(hidden.shape)}")
    rows, new = int(hidden.shape[0]), int(hidden.shape[1])
    if rows < 1 or new < 1:
        raise WireError("hidden has no rows or no positions")
    if session.next_step > 0 and (rows != session.rows or new != 1):
        raise WireError(f"a decode step sends one new position for each of the session's {session.rows} rows, "
                        f"got {list(hidden.shape[:2])}")
    reorder = None
    if msg.reorder.ByteSize():
        if session.next_step == 0:
            raise WireError("reorder needs a cache: the prefill cannot reorder")
        reorder = _ints(msg.reorder, "reorder", (rows,))
        if reorder.min() < 0 or reorder.max() >= session.rows:
            raise WireError(f"reorder indices must be in [0, {session.rows})")
    mask = _ints(msg.attention_mask, "attention_mask", (rows, session.cached_tokens + new))
    if not ((mask == 0) | (mask == 1)).all() or not mask.any(dim=1).all():
        raise WireError("attention_mask may only hold 0 and 1, with at least one 1 per row")
    positions = _ints(msg.position_ids, "position_ids", (rows, new))
    if positions.min() < 0 or positions.max() >= max_positions:
        raise WireError(f"position_ids must be in [0, {max_positions})")
    return StepInput(hidden.float(), mask, positions, reorder)


def decode_score(msg: gpb.ScoreRequest, limits: FrameLimits, codecs: set[int], u_shape: bool = False) -> Step:
    """The tensors of a score request, checked like a training step (same limits, any allowed codec; in `u_shape`
    mode labels are refused, else required)."""
    if (msg.hidden.codec or 1) not in codecs:
        raise WireError("hidden is encoded in a codec the server does not accept (see its --codecs)")
    fwd = spb.StepForward(hidden=msg.hidden, attention_mask=msg.attention_mask, position_ids=msg.position_ids)
    if msg.HasField("labels"):
        fwd.labels.CopyFrom(msg.labels)
    return decode_step(fwd, limits, u_shape=u_shape)
