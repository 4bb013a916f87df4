from common.rpc.splitlora.v1 import split_pb2 as _split_pb2
from common.rpc.splitlora.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServerAdapter(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVER_ADAPTER_UNSPECIFIED: _ClassVar[ServerAdapter]
    SERVER_ADAPTER_SHARED: _ClassVar[ServerAdapter]
    SERVER_ADAPTER_OWN: _ClassVar[ServerAdapter]
    SERVER_ADAPTER_NONE: _ClassVar[ServerAdapter]

class ReplyKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLY_UNSPECIFIED: _ClassVar[ReplyKind]
    REPLY_LOGITS: _ClassVar[ReplyKind]
    REPLY_TOP_K: _ClassVar[ReplyKind]
    REPLY_HIDDEN: _ClassVar[ReplyKind]
SERVER_ADAPTER_UNSPECIFIED: ServerAdapter
SERVER_ADAPTER_SHARED: ServerAdapter
SERVER_ADAPTER_OWN: ServerAdapter
SERVER_ADAPTER_NONE: ServerAdapter
REPLY_UNSPECIFIED: ReplyKind
REPLY_LOGITS: ReplyKind
REPLY_TOP_K: ReplyKind
REPLY_HIDDEN: ReplyKind

class SessionOpen(_message.Message):
    __slots__ = ("adapter", "reply", "top_k", "max_tokens", "codec", "fingerprint")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    adapter: ServerAdapter
    reply: ReplyKind
    top_k: int
    max_tokens: int
    codec: _tensor_pb2.Codec
    fingerprint: _split_pb2.Fingerprint
    def __init__(self, adapter: _Optional[_Union[ServerAdapter, str]] = ..., reply: _Optional[_Union[ReplyKind, str]] = ..., top_k: _Optional[int] = ..., max_tokens: _Optional[int] = ..., codec: _Optional[_Union[_tensor_pb2.Codec, str]] = ..., fingerprint: _Optional[_Union[_split_pb2.Fingerprint, _Mapping]] = ...) -> None: ...

class GenerationStep(_message.Message):
    __slots__ = ("session", "step", "hidden", "attention_mask", "position_ids", "reorder")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    REORDER_FIELD_NUMBER: _ClassVar[int]
    session: str
    step: int
    hidden: _tensor_pb2.Tensor
    attention_mask: _tensor_pb2.Tensor
    position_ids: _tensor_pb2.Tensor
    reorder: _tensor_pb2.Tensor
    def __init__(self, session: _Optional[str] = ..., step: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., reorder: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GenerationRequest(_message.Message):
    __slots__ = ("open", "step", "part")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    step: GenerationStep
    part: _tensor_pb2.FramePart
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., step: _Optional[_Union[GenerationStep, _Mapping]] = ..., part: _Optional[_Union[_tensor_pb2.FramePart, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session", "max_tokens", "max_cache_bytes", "max_batch", "idle_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: str
    max_tokens: int
    max_cache_bytes: int
    max_batch: int
    idle_seconds: float
    def __init__(self, session: _Optional[str] = ..., max_tokens: _Optional[int] = ..., max_cache_bytes: _Optional[int] = ..., max_batch: _Optional[int] = ..., idle_seconds: _Optional[float] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("log_probs", "token_ids")
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    log_probs: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    def __init__(self, log_probs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("step", "logits", "top_k", "hidden", "cached_tokens", "cache_bytes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    step: int
    logits: _tensor_pb2.Tensor
    top_k: TopK
    hidden: _tensor_pb2.Tensor
    cached_tokens: int
    cache_bytes: int
    def __init__(self, step: _Optional[int] = ..., logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., top_k: _Optional[_Union[TopK, _Mapping]] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cached_tokens: _Optional[int] = ..., cache_bytes: _Optional[int] = ...) -> None: ...

class GenerationReply(_message.Message):
    __slots__ = ("opened", "step", "part")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    step: StepReply
    part: _tensor_pb2.FramePart
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., step: _Optional[_Union[StepReply, _Mapping]] = ..., part: _Optional[_Union[_tensor_pb2.FramePart, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("adapter", "hidden", "attention_mask", "position_ids", "labels", "round", "samples", "last", "fingerprint")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    adapter: ServerAdapter
    hidden: _tensor_pb2.Tensor
    attention_mask: _tensor_pb2.Tensor
    position_ids: _tensor_pb2.Tensor
    labels: _tensor_pb2.Tensor
    round: int
    samples: int
    last: bool
    fingerprint: _split_pb2.Fingerprint
    def __init__(self, adapter: _Optional[_Union[ServerAdapter, str]] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., round: _Optional[int] = ..., samples: _Optional[int] = ..., last: _Optional[bool] = ..., fingerprint: _Optional[_Union[_split_pb2.Fingerprint, _Mapping]] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("loss_sum", "tokens", "hidden")
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    loss_sum: float
    tokens: int
    hidden: _tensor_pb2.Tensor
    def __init__(self, loss_sum: _Optional[float] = ..., tokens: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
