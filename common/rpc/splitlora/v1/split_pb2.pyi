from common.rpc.splitlora.v1 import router_pb2 as _router_pb2
from common.rpc.splitlora.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Fingerprint(_message.Message):
    __slots__ = ("family", "config_sha256", "index_sha256", "client_weights_sha256", "split_layer", "lora_sha256", "num_layers", "hidden_size", "vocab_size", "split_mode", "top_blocks")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    INDEX_SHA256_FIELD_NUMBER: _ClassVar[int]
    CLIENT_WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LORA_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_MODE_FIELD_NUMBER: _ClassVar[int]
    TOP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    family: str
    config_sha256: str
    index_sha256: str
    client_weights_sha256: str
    split_layer: int
    lora_sha256: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    split_mode: str
    top_blocks: int
    def __init__(self, family: _Optional[str] = ..., config_sha256: _Optional[str] = ..., index_sha256: _Optional[str] = ..., client_weights_sha256: _Optional[str] = ..., split_layer: _Optional[int] = ..., lora_sha256: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., split_mode: _Optional[str] = ..., top_blocks: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "fingerprint", "codecs", "client_version", "max_message_bytes", "micro_batches")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    fingerprint: Fingerprint
    codecs: _containers.RepeatedScalarFieldContainer[_tensor_pb2.Codec]
    client_version: str
    max_message_bytes: int
    micro_batches: int
    def __init__(self, client_id: _Optional[str] = ..., fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., codecs: _Optional[_Iterable[_Union[_tensor_pb2.Codec, str]]] = ..., client_version: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., micro_batches: _Optional[int] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("rounds", "local_steps", "batch_size", "learning_rate", "weight_decay", "warmup_steps", "max_seq_len", "label_smoothing", "seed", "max_grad_norm")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    max_seq_len: int
    label_smoothing: float
    seed: int
    max_grad_norm: float
    def __init__(self, rounds: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., label_smoothing: _Optional[float] = ..., seed: _Optional[int] = ..., max_grad_norm: _Optional[float] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("model_options_json", "schedule", "family", "initial_client_adapter", "send_final_adapter")
    MODEL_OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_CLIENT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SEND_FINAL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model_options_json: str
    schedule: Schedule
    family: str
    initial_client_adapter: bytes
    send_final_adapter: bool
    def __init__(self, model_options_json: _Optional[str] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., family: _Optional[str] = ..., initial_client_adapter: _Optional[bytes] = ..., send_final_adapter: _Optional[bool] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("session", "schedule", "aggregator_address", "codec", "max_message_bytes", "chunk_bytes", "start_round", "num_clients", "server_version", "aggregation", "micro_batches")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    START_ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    session: str
    schedule: Schedule
    aggregator_address: str
    codec: _tensor_pb2.Codec
    max_message_bytes: int
    chunk_bytes: int
    start_round: int
    num_clients: int
    server_version: str
    aggregation: str
    micro_batches: int
    def __init__(self, session: _Optional[str] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., aggregator_address: _Optional[str] = ..., codec: _Optional[_Union[_tensor_pb2.Codec, str]] = ..., max_message_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., start_round: _Optional[int] = ..., num_clients: _Optional[int] = ..., server_version: _Optional[str] = ..., aggregation: _Optional[str] = ..., micro_batches: _Optional[int] = ...) -> None: ...

class StepForward(_message.Message):
    __slots__ = ("step", "round", "hidden", "attention_mask", "labels", "position_ids", "router", "micro", "micro_count", "step_tokens")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    MICRO_COUNT_FIELD_NUMBER: _ClassVar[int]
    STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    step: int
    round: int
    hidden: _tensor_pb2.Tensor
    attention_mask: _tensor_pb2.Tensor
    labels: _tensor_pb2.Tensor
    position_ids: _tensor_pb2.Tensor
    router: _router_pb2.RouterStats
    micro: int
    micro_count: int
    step_tokens: int
    def __init__(self, step: _Optional[int] = ..., round: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., router: _Optional[_Union[_router_pb2.RouterStats, _Mapping]] = ..., micro: _Optional[int] = ..., micro_count: _Optional[int] = ..., step_tokens: _Optional[int] = ...) -> None: ...

class StepTopGrad(_message.Message):
    __slots__ = ("step", "grad", "micro")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad: _tensor_pb2.Tensor
    micro: int
    def __init__(self, step: _Optional[int] = ..., grad: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., micro: _Optional[int] = ...) -> None: ...

class ClientFrame(_message.Message):
    __slots__ = ("forward", "part", "top_grad")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    TOP_GRAD_FIELD_NUMBER: _ClassVar[int]
    forward: StepForward
    part: _tensor_pb2.FramePart
    top_grad: StepTopGrad
    def __init__(self, forward: _Optional[_Union[StepForward, _Mapping]] = ..., part: _Optional[_Union[_tensor_pb2.FramePart, _Mapping]] = ..., top_grad: _Optional[_Union[StepTopGrad, _Mapping]] = ...) -> None: ...

class StepBackward(_message.Message):
    __slots__ = ("step", "grad", "loss", "tokens", "bytes_received", "router", "micro")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad: _tensor_pb2.Tensor
    loss: float
    tokens: int
    bytes_received: int
    router: _router_pb2.RouterBackward
    micro: int
    def __init__(self, step: _Optional[int] = ..., grad: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., loss: _Optional[float] = ..., tokens: _Optional[int] = ..., bytes_received: _Optional[int] = ..., router: _Optional[_Union[_router_pb2.RouterBackward, _Mapping]] = ..., micro: _Optional[int] = ...) -> None: ...

class StepTop(_message.Message):
    __slots__ = ("step", "hidden", "bytes_received", "micro")
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    step: int
    hidden: _tensor_pb2.Tensor
    bytes_received: int
    micro: int
    def __init__(self, step: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., bytes_received: _Optional[int] = ..., micro: _Optional[int] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("backward", "part", "top")
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    backward: StepBackward
    part: _tensor_pb2.FramePart
    top: StepTop
    def __init__(self, backward: _Optional[_Union[StepBackward, _Mapping]] = ..., part: _Optional[_Union[_tensor_pb2.FramePart, _Mapping]] = ..., top: _Optional[_Union[StepTop, _Mapping]] = ...) -> None: ...

class ServerAdapterRequest(_message.Message):
    __slots__ = ("client_id", "max_message_bytes")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    max_message_bytes: int
    def __init__(self, client_id: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class AdapterPiece(_message.Message):
    __slots__ = ("safetensors_chunk",)
    SAFETENSORS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    safetensors_chunk: bytes
    def __init__(self, safetensors_chunk: _Optional[bytes] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("client_id", "connected", "round", "steps", "last_loss", "bytes_in", "bytes_out", "last_error")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    connected: bool
    round: int
    steps: int
    last_loss: float
    bytes_in: int
    bytes_out: int
    last_error: str
    def __init__(self, client_id: _Optional[str] = ..., connected: _Optional[bool] = ..., round: _Optional[int] = ..., steps: _Optional[int] = ..., last_loss: _Optional[float] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class RefusalCount(_message.Message):
    __slots__ = ("caller", "reason", "count")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    caller: str
    reason: str
    count: int
    def __init__(self, caller: _Optional[str] = ..., reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("round", "rounds", "steps", "steps_per_second", "clients", "server_adapter_mode", "finished", "round_status", "waiting_for_quorum", "refusals", "incidents", "generation_sessions", "generation_cache_bytes", "generation_tokens", "validation_round", "validation_loss")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ADAPTER_MODE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ROUND_STATUS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_QUORUM_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    INCIDENTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ROUND_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    round: int
    rounds: int
    steps: int
    steps_per_second: float
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    server_adapter_mode: str
    finished: bool
    round_status: str
    waiting_for_quorum: bool
    refusals: _containers.RepeatedCompositeFieldContainer[RefusalCount]
    incidents: _containers.RepeatedScalarFieldContainer[str]
    generation_sessions: int
    generation_cache_bytes: int
    generation_tokens: int
    validation_round: int
    validation_loss: float
    def __init__(self, round: _Optional[int] = ..., rounds: _Optional[int] = ..., steps: _Optional[int] = ..., steps_per_second: _Optional[float] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., server_adapter_mode: _Optional[str] = ..., finished: _Optional[bool] = ..., round_status: _Optional[str] = ..., waiting_for_quorum: _Optional[bool] = ..., refusals: _Optional[_Iterable[_Union[RefusalCount, _Mapping]]] = ..., incidents: _Optional[_Iterable[str]] = ..., generation_sessions: _Optional[int] = ..., generation_cache_bytes: _Optional[int] = ..., generation_tokens: _Optional[int] = ..., validation_round: _Optional[int] = ..., validation_loss: _Optional[float] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
