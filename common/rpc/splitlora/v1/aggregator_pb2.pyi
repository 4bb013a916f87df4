from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterUpload(_message.Message):
    __slots__ = ("client_id", "round", "num_samples", "safetensors_chunk")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    num_samples: int
    safetensors_chunk: bytes
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ..., safetensors_chunk: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("round", "submitted", "expected")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    round: int
    submitted: int
    expected: int
    def __init__(self, round: _Optional[int] = ..., submitted: _Optional[int] = ..., expected: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("client_id", "round", "max_message_bytes")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    max_message_bytes: int
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class AdapterDownload(_message.Message):
    __slots__ = ("round", "num_clients", "total_samples", "safetensors_chunk")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_clients: int
    total_samples: int
    safetensors_chunk: bytes
    def __init__(self, round: _Optional[int] = ..., num_clients: _Optional[int] = ..., total_samples: _Optional[int] = ..., safetensors_chunk: _Optional[bytes] = ...) -> None: ...
