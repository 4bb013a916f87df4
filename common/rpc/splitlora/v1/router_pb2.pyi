from common.rpc.splitlora.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouterStats(_message.Message):
    __slots__ = ("expert_counts", "expert_probs", "rows")
    EXPERT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PROBS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    expert_counts: _tensor_pb2.Tensor
    expert_probs: _tensor_pb2.Tensor
    rows: float
    def __init__(self, expert_counts: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expert_probs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., rows: _Optional[float] = ...) -> None: ...

class RouterBackward(_message.Message):
    __slots__ = ("expert_probs_grad", "aux_loss")
    EXPERT_PROBS_GRAD_FIELD_NUMBER: _ClassVar[int]
    AUX_LOSS_FIELD_NUMBER: _ClassVar[int]
    expert_probs_grad: _tensor_pb2.Tensor
    aux_loss: float
    def __init__(self, expert_probs_grad: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., aux_loss: _Optional[float] = ...) -> None: ...
