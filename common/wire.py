"""Tensors <-> protobuf: dtypes, codecs, validation and chunking of large frames.

This is the only place that turns tensors into bytes. Tensors travel as raw little-endian
bytes plus dtype and shape; nothing is ever pickled.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from common.limits import MIN_CHUNK_BYTES
from common.rpc.splitlora.v1 import tensor_pb2 as pb

M = TypeVar("M", bound=Any)  # a protobuf message with a `kind` oneof that may be a `part`

_TORCH_BY_DTYPE: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT8: torch.int8,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_BOOL: torch.bool,
}
_DTYPE_BY_TORCH = {v: k for k, v in _TORCH_BY_DTYPE.items()}
_FLOAT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
CODEC_NAMES: dict[str, int] = {
    "float32": pb.CODEC_RAW, "raw": pb.CODEC_RAW, "float16": pb.CODEC_FLOAT16,
    "bfloat16": pb.CODEC_BFLOAT16, "int8": pb.CODEC_INT8,
}
MAX_DIMS = 8


class WireError(ValueError):
    """A tensor or frame on the wire is malformed; the message says what is wrong."""


def codec_from_name(name: str) -> int:
    """Map a codec name (float32, float16, bfloat16, int8) to its proto enum value."""
    try:
        return CODEC_NAMES[name.lower()]
    except KeyError:
        raise WireError(f"unknown codec {name!r}; choose one of {sorted(set(CODEC_NAMES) - {'raw'})}") from None


def codec_name(codec: int) -> str:
    """The human name of a codec enum value."""
    return {pb.CODEC_UNSPECIFIED: "float32", pb.CODEC_RAW: "float32", pb.CODEC_FLOAT16: "float16",
            pb.CODEC_BFLOAT16: "bfloat16", pb.CODEC_INT8: "int8"}.get(codec, f"codec#{codec}")


def dtype_name(dtype: int) -> str:
    """The human name of a proto dtype enum value."""
    return pb.DType.Name(dtype).removeprefix("DTYPE_").lower() if dtype in pb.DType.values() else f"dtype#{dtype}"


# Tensors are turned into bytes and back with numpy on the raw buffers, never with torch ops: the gRPC handler
# threads that call this must not start torch's (OpenMP) thread pools of their own beside the compute thread's
# (more OpenMP threads than cores make libgomp throttle the compute thread's helpers). bfloat16 travels as its
# 16 bits; numpy has no bfloat16, so its conversions are done on the bits (round to nearest even, as torch does).
_NUMPY_BY_TORCH: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(np.uint16),
    torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32), torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8), torch.bool: np.dtype(np.bool_)}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's values as a numpy array (bfloat16 as uint16 bits), sharing its memory where it can."""
    t = t.detach() if t.device.type == "cpu" else t.detach().cpu()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _as_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over a writable numpy array's memory (bfloat16 from uint16 bits)."""
    arr = np.asarray(arr)  # numpy arithmetic on a 0-d array gives a numpy scalar, which torch does not take
    if dtype == torch.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _to_float32(arr: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.bfloat16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def _from_float32(arr: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.bfloat16:
        bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
        return np.where(np.isnan(arr), np.uint32(0x7FC0), rounded).astype(np.uint16)
    return arr.astype(_NUMPY_BY_TORCH[dtype])


def _all_finite(arr: np.ndarray, dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return bool(((arr & 0x7F80) != 0x7F80).all())
    return bool(np.isfinite(arr).all())


def _rows(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, row length) of the int8 codec: one scale per row, a row being the last dimension."""
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) else (1, 1)


def _int8(values: np.ndarray, shape: Sequence[int]) -> tuple[bytes, bytes]:
    """Per-row absmax int8 of float32 values: the codes and the float32 row scales."""
    rows = values.reshape(_rows(shape))
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(rows.shape[0], np.float32)
    scales = np.maximum(peak, np.float32(1e-12)) / np.float32(127.0)
    codes = np.clip(np.round(rows / scales[:, None]), -127, 127).astype(np.int8)
    return codes.tobytes(), scales.astype(np.float32).tobytes()


def encode_tensor(t: torch.Tensor, codec: int = pb.CODEC_RAW) -> pb.Tensor:
    """Encode a tensor; float tensors may be compressed with a lossy codec, others are always raw."""
    if t.dtype not in _DTYPE_BY_TORCH:
        raise WireError(f"dtype {t.dtype} cannot be sent")
    msg = pb.Tensor(shape=list(t.shape), dtype=_DTYPE_BY_TORCH[t.dtype])
    values = _as_numpy(t)
    if not t.is_floating_point() or codec in (pb.CODEC_RAW, pb.CODEC_UNSPECIFIED):
        msg.codec, msg.data = pb.CODEC_RAW, values.tobytes()
        return msg
    with np.errstate(over="ignore", invalid="ignore"):  # out of range becomes inf, as with torch's casts
        msg.codec, msg.data, scales = codec, *_lossy(_to_float32(values, t.dtype), codec, t.shape)
    if scales is not None:
        msg.scales = scales
    return msg


def _lossy(wide: np.ndarray, codec: int, shape: Sequence[int]) -> tuple[bytes, bytes | None]:
    if codec == pb.CODEC_FLOAT16:
        return wide.astype(np.float16).tobytes(), None
    if codec == pb.CODEC_BFLOAT16:
        return _from_float32(wide, torch.bfloat16).tobytes(), None
    if codec == pb.CODEC_INT8:
        return _int8(wide, shape)
    raise WireError(f"unknown codec {codec}")


def _check_shape(shape: Sequence[int], max_elements: int | None) -> int:
    if len(shape) > MAX_DIMS:
        raise WireError(f"tensor has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    if any(d < 0 for d in shape):
        raise WireError(f"tensor shape {list(shape)[:MAX_DIMS]} has a negative dimension")
    numel = math.prod(shape)
    if max_elements is not None:  # every dimension too: [0, 2**62, H] holds no element but overflows strides
        largest = math.prod(d for d in shape if d)
        if largest > max_elements:
            raise WireError(f"tensor shape {list(shape)} has {largest} elements (ignoring empty dimensions); "
                            f"the limit is {max_elements}")
    return numel


def decode_tensor(msg: pb.Tensor, *, name: str = "tensor", max_elements: int | None = None,
                  require_finite: bool = True, float32: bool = False) -> torch.Tensor:
    """Decode and validate a tensor: known dtype and codec, byte count matching the shape, finite floats.
    `float32`: return a float tensor as float32 whatever its dtype on the wire (converted in numpy)."""
    if msg.dtype not in _TORCH_BY_DTYPE:
        raise WireError(f"{name}: unknown dtype {msg.dtype}")
    shape = list(msg.shape)
    numel = _check_shape(shape, max_elements)
    dtype = _TORCH_BY_DTYPE[msg.dtype]
    dtype = torch.float32 if float32 and dtype.is_floating_point else dtype
    codec = msg.codec or pb.CODEC_RAW
    if codec != pb.CODEC_RAW and msg.dtype not in _FLOAT_DTYPES:
        raise WireError(f"{name}: codec {codec_name(codec)} is only for float tensors, got {dtype_name(msg.dtype)}")
    wire_dtype = {pb.CODEC_RAW: _TORCH_BY_DTYPE[msg.dtype], pb.CODEC_FLOAT16: torch.float16, pb.CODEC_BFLOAT16: torch.bfloat16,
                  pb.CODEC_INT8: torch.int8}.get(codec)
    if wire_dtype is None:
        raise WireError(f"{name}: unknown codec {codec}")
    expected = numel * torch.empty(0, dtype=wire_dtype).element_size()
    if len(msg.data) != expected:
        raise WireError(f"{name}: shape {shape} as {codec_name(codec) if codec != pb.CODEC_RAW else dtype_name(msg.dtype)}"
                        f" needs {expected} bytes, got {len(msg.data)}")
    values = np.frombuffer(msg.data, dtype=_NUMPY_BY_TORCH[wire_dtype]).reshape(shape)
    if codec == pb.CODEC_INT8:
        rows, width = _rows(shape)
        if len(msg.scales) != rows * 4:
            raise WireError(f"{name}: int8 codec needs {rows} float32 row scales ({rows * 4} bytes), got {len(msg.scales)}")
        scales = np.frombuffer(msg.scales, dtype=np.float32)
        if not np.isfinite(scales).all():
            raise WireError(f"{name}: int8 row scales contain NaN or Inf")
        values = (values.reshape(rows, width).astype(np.float32) * scales[:, None]).reshape(shape)
        wire_dtype = torch.float32
    if wire_dtype == dtype:
        out = values if values.flags.writeable else values.copy()  # torch needs writable memory
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # out of range becomes inf: refused below
            out = _from_float32(_to_float32(values, wire_dtype), dtype)
    if require_finite and dtype.is_floating_point and not _all_finite(out, dtype):
        raise WireError(f"{name}: contains NaN or Inf values")
    return _as_torch(out, dtype)


def wire_size(msg) -> int:
    """Bytes a protobuf message takes on the wire."""
    return msg.ByteSize()


def split_bytes(data: bytes, message_id: int, chunk_bytes: int) -> list[pb.FramePart]:
    """Cut a serialized message into FrameParts of at most `chunk_bytes` payload each."""
    if chunk_bytes <= 0:
        raise WireError("chunk size must be positive")
    count = max(1, math.ceil(len(data) / chunk_bytes))
    return [pb.FramePart(message_id=message_id, index=i, count=count,
                         data=data[i * chunk_bytes:(i + 1) * chunk_bytes]) for i in range(count)]


class Reassembler:
    """Collects FrameParts of one message at a time and returns the whole bytes when complete.

    `max_bytes` bounds a message; with `max_piece` (the negotiated piece size) every piece is bounded too, and a
    message announcing more pieces than `max_bytes` can need is refused at its first piece."""

    def __init__(self, max_bytes: int, max_piece: int | None = None) -> None:
        self.max_bytes, self.max_piece = max_bytes, max_piece
        self._id: int | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._count = 0

    def add(self, part: pb.FramePart) -> bytes | None:
        """Add a part; return the reassembled bytes once the last part arrived, else None."""
        if self._id is None:
            if part.index != 0 or part.count == 0:
                raise WireError(f"frame part {part.index}/{part.count} arrived before part 0")
            if self.max_piece and part.count > math.ceil(self.max_bytes / MIN_CHUNK_BYTES) + 1:
                raise WireError(f"a frame announced as {part.count} pieces exceeds the largest frame this stream may "
                                f"send ({self.max_bytes} bytes, in pieces of at least {MIN_CHUNK_BYTES} bytes)")
            self._id, self._count = part.message_id, part.count
        if self.max_piece and len(part.data) > self.max_piece:
            self.clear()
            raise WireError(f"frame piece of {len(part.data)} bytes exceeds the negotiated piece size "
                            f"({self.max_piece} bytes)")
        elif part.message_id != self._id or part.index != len(self._parts) or part.count != self._count:
            raise WireError(f"frame part out of order: got message {part.message_id} part {part.index}/{part.count},"
                            f" expected message {self._id} part {len(self._parts)}/{self._count}")
        self._size += len(part.data)
        if self._size > self.max_bytes:
            self.clear()
            raise WireError(f"reassembled frame exceeds the largest frame this stream may send "
                            f"({self.max_bytes} bytes)")
        self._parts.append(part.data)
        if len(self._parts) < self._count:
            return None
        data = b"".join(self._parts)
        self.clear()
        return data

    def whole(self, message: M, parse: Callable[[bytes], M]) -> M | None:
        """`message` of a stream whose messages may travel in pieces (a `part` field): itself when it is whole,
        else the message `parse`d from its pieces once the last one arrived (None before)."""
        if message.WhichOneof("kind") != "part":
            return message
        data = self.add(message.part)
        return None if data is None else parse(data)

    def clear(self) -> None:
        """Drop a partly received message (its stream ended or was refused)."""
        self._id, self._parts, self._size, self._count = None, [], 0, 0

    @property
    def pending(self) -> bool:
        """True while a message is partially received."""
        return self._id is not None


def serialized(frame, frame_cls, chunk_bytes: int, message_id: int = 0) -> list[bytes]:
    """A frame serialized once, ready for a stream without serializers: its bytes when they fit in `chunk_bytes`,
    else the bytes of `frame_cls(part=...)` pieces. The byte count of what is sent is `len` of these."""
    data = frame.SerializeToString()
    if len(data) <= chunk_bytes:
        return [data]
    return [frame_cls(part=part).SerializeToString() for part in split_bytes(data, message_id, chunk_bytes)]


def chunked(frames: Iterable, frame_cls, chunk_bytes: int) -> Iterator:
    """Yield each frame as is, or as `frame_cls(part=...)` pieces when it is larger than `chunk_bytes` (for
    callers that hand messages to a generated stub, which serializes them; the roles' streams use `serialized`)."""
    for message_id, frame in enumerate(frames):
        data = frame.SerializeToString()
        if len(data) <= chunk_bytes:
            yield frame
        else:
            for part in split_bytes(data, message_id, chunk_bytes):
                yield frame_cls(part=part)


def method_path(service: str, method: str) -> str:
    """The gRPC path of a method of a proto service, e.g. /splitlora.v1.SplitTraining/Train."""
    return f"/{service}/{method}"
