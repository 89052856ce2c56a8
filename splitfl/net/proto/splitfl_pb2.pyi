from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_1: _ClassVar[ProtocolVersion]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_UNSUPPORTED_VERSION: _ClassVar[ErrorCode]
    ERROR_CODE_RUN_MISMATCH: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_TOKEN: _ClassVar[ErrorCode]
    ERROR_CODE_SITE_MISMATCH: _ClassVar[ErrorCode]
    ERROR_CODE_UNKNOWN_SESSION: _ClassVar[ErrorCode]
    ERROR_CODE_REPLAYED: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_CHUNKS: _ClassVar[ErrorCode]
    ERROR_CODE_TOO_LARGE: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_PAYLOAD: _ClassVar[ErrorCode]
    ERROR_CODE_OUT_OF_ORDER: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_SAMPLED: _ClassVar[ErrorCode]
    ERROR_CODE_DEADLINE_PASSED: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_SERVING: _ClassVar[ErrorCode]

class ServingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATE_UNSPECIFIED: _ClassVar[ServingState]
    SERVING_STATE_STARTING: _ClassVar[ServingState]
    SERVING_STATE_SERVING: _ClassVar[ServingState]
    SERVING_STATE_DRAINING: _ClassVar[ServingState]
    SERVING_STATE_FINISHED: _ClassVar[ServingState]

class PayloadEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_ENCODING_UNSPECIFIED: _ClassVar[PayloadEncoding]
    PAYLOAD_ENCODING_TENSOR: _ClassVar[PayloadEncoding]
    PAYLOAD_ENCODING_CKKS_BATCH: _ClassVar[PayloadEncoding]
    PAYLOAD_ENCODING_CKKS_LIST: _ClassVar[PayloadEncoding]

class SplitMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPLIT_MODE_UNSPECIFIED: _ClassVar[SplitMode]
    SPLIT_MODE_PLAIN: _ClassVar[SplitMode]
    SPLIT_MODE_HE: _ClassVar[SplitMode]
    SPLIT_MODE_HE_FULL: _ClassVar[SplitMode]

class TurnState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TURN_STATE_UNSPECIFIED: _ClassVar[TurnState]
    TURN_STATE_YOURS: _ClassVar[TurnState]
    TURN_STATE_WAIT: _ClassVar[TurnState]
    TURN_STATE_EPOCH_DONE: _ClassVar[TurnState]
    TURN_STATE_RUN_DONE: _ClassVar[TurnState]
    TURN_STATE_EVALUATE: _ClassVar[TurnState]
    TURN_STATE_RELEASE: _ClassVar[TurnState]

class WeightsPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHTS_PURPOSE_UNSPECIFIED: _ClassVar[WeightsPurpose]
    WEIGHTS_PURPOSE_INITIAL: _ClassVar[WeightsPurpose]
    WEIGHTS_PURPOSE_REFRESH: _ClassVar[WeightsPurpose]
    WEIGHTS_PURPOSE_RELEASE: _ClassVar[WeightsPurpose]

class SecureMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECURE_MODE_UNSPECIFIED: _ClassVar[SecureMode]
    SECURE_MODE_NONE: _ClassVar[SecureMode]
    SECURE_MODE_HE: _ClassVar[SecureMode]
    SECURE_MODE_MASKS: _ClassVar[SecureMode]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_WAITING: _ClassVar[RoundState]
    ROUND_STATE_TRAINING: _ClassVar[RoundState]
    ROUND_STATE_AGGREGATING: _ClassVar[RoundState]
    ROUND_STATE_FINISHED: _ClassVar[RoundState]

class ModelPart(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_PART_UNSPECIFIED: _ClassVar[ModelPart]
    MODEL_PART_GLOBAL_MODEL: _ClassVar[ModelPart]
    MODEL_PART_ENCRYPTED_AGGREGATE: _ClassVar[ModelPart]
    MODEL_PART_PLAIN_AGGREGATE: _ClassVar[ModelPart]

class UpdateEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_ENCODING_UNSPECIFIED: _ClassVar[UpdateEncoding]
    UPDATE_ENCODING_FLOAT32: _ClassVar[UpdateEncoding]
    UPDATE_ENCODING_TOPK: _ClassVar[UpdateEncoding]
    UPDATE_ENCODING_CKKS: _ClassVar[UpdateEncoding]
    UPDATE_ENCODING_DECRYPTED_MEAN: _ClassVar[UpdateEncoding]

class SecAggMessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_MESSAGE_TYPE_UNSPECIFIED: _ClassVar[SecAggMessageType]
    SECAGG_MESSAGE_TYPE_ADVERTISE_KEYS: _ClassVar[SecAggMessageType]
    SECAGG_MESSAGE_TYPE_KEY_BROADCAST: _ClassVar[SecAggMessageType]
    SECAGG_MESSAGE_TYPE_SHARE_KEYS: _ClassVar[SecAggMessageType]
    SECAGG_MESSAGE_TYPE_SHARE_DELIVERY: _ClassVar[SecAggMessageType]
    SECAGG_MESSAGE_TYPE_MASKED_INPUT: _ClassVar[SecAggMessageType]
    SECAGG_MESSAGE_TYPE_UNMASK_REQUEST: _ClassVar[SecAggMessageType]
    SECAGG_MESSAGE_TYPE_UNMASK_RESPONSE: _ClassVar[SecAggMessageType]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_1: ProtocolVersion
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_UNSUPPORTED_VERSION: ErrorCode
ERROR_CODE_RUN_MISMATCH: ErrorCode
ERROR_CODE_BAD_TOKEN: ErrorCode
ERROR_CODE_SITE_MISMATCH: ErrorCode
ERROR_CODE_UNKNOWN_SESSION: ErrorCode
ERROR_CODE_REPLAYED: ErrorCode
ERROR_CODE_BAD_CHUNKS: ErrorCode
ERROR_CODE_TOO_LARGE: ErrorCode
ERROR_CODE_BAD_PAYLOAD: ErrorCode
ERROR_CODE_OUT_OF_ORDER: ErrorCode
ERROR_CODE_NOT_SAMPLED: ErrorCode
ERROR_CODE_DEADLINE_PASSED: ErrorCode
ERROR_CODE_NOT_SERVING: ErrorCode
SERVING_STATE_UNSPECIFIED: ServingState
SERVING_STATE_STARTING: ServingState
SERVING_STATE_SERVING: ServingState
SERVING_STATE_DRAINING: ServingState
SERVING_STATE_FINISHED: ServingState
PAYLOAD_ENCODING_UNSPECIFIED: PayloadEncoding
PAYLOAD_ENCODING_TENSOR: PayloadEncoding
PAYLOAD_ENCODING_CKKS_BATCH: PayloadEncoding
PAYLOAD_ENCODING_CKKS_LIST: PayloadEncoding
SPLIT_MODE_UNSPECIFIED: SplitMode
SPLIT_MODE_PLAIN: SplitMode
SPLIT_MODE_HE: SplitMode
SPLIT_MODE_HE_FULL: SplitMode
TURN_STATE_UNSPECIFIED: TurnState
TURN_STATE_YOURS: TurnState
TURN_STATE_WAIT: TurnState
TURN_STATE_EPOCH_DONE: TurnState
TURN_STATE_RUN_DONE: TurnState
TURN_STATE_EVALUATE: TurnState
TURN_STATE_RELEASE: TurnState
WEIGHTS_PURPOSE_UNSPECIFIED: WeightsPurpose
WEIGHTS_PURPOSE_INITIAL: WeightsPurpose
WEIGHTS_PURPOSE_REFRESH: WeightsPurpose
WEIGHTS_PURPOSE_RELEASE: WeightsPurpose
SECURE_MODE_UNSPECIFIED: SecureMode
SECURE_MODE_NONE: SecureMode
SECURE_MODE_HE: SecureMode
SECURE_MODE_MASKS: SecureMode
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_WAITING: RoundState
ROUND_STATE_TRAINING: RoundState
ROUND_STATE_AGGREGATING: RoundState
ROUND_STATE_FINISHED: RoundState
MODEL_PART_UNSPECIFIED: ModelPart
MODEL_PART_GLOBAL_MODEL: ModelPart
MODEL_PART_ENCRYPTED_AGGREGATE: ModelPart
MODEL_PART_PLAIN_AGGREGATE: ModelPart
UPDATE_ENCODING_UNSPECIFIED: UpdateEncoding
UPDATE_ENCODING_FLOAT32: UpdateEncoding
UPDATE_ENCODING_TOPK: UpdateEncoding
UPDATE_ENCODING_CKKS: UpdateEncoding
UPDATE_ENCODING_DECRYPTED_MEAN: UpdateEncoding
SECAGG_MESSAGE_TYPE_UNSPECIFIED: SecAggMessageType
SECAGG_MESSAGE_TYPE_ADVERTISE_KEYS: SecAggMessageType
SECAGG_MESSAGE_TYPE_KEY_BROADCAST: SecAggMessageType
SECAGG_MESSAGE_TYPE_SHARE_KEYS: SecAggMessageType
SECAGG_MESSAGE_TYPE_SHARE_DELIVERY: SecAggMessageType
SECAGG_MESSAGE_TYPE_MASKED_INPUT: SecAggMessageType
SECAGG_MESSAGE_TYPE_UNMASK_REQUEST: SecAggMessageType
SECAGG_MESSAGE_TYPE_UNMASK_RESPONSE: SecAggMessageType

class RequestHeader(_message.Message):
    __slots__ = ("protocol_version", "run_id", "config_fingerprint", "site_id", "session_id", "sequence")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    run_id: str
    config_fingerprint: bytes
    site_id: int
    session_id: bytes
    sequence: int
    def __init__(self, protocol_version: _Optional[int] = ..., run_id: _Optional[str] = ..., config_fingerprint: _Optional[bytes] = ..., site_id: _Optional[int] = ..., session_id: _Optional[bytes] = ..., sequence: _Optional[int] = ...) -> None: ...

class ResponseHeader(_message.Message):
    __slots__ = ("protocol_version", "sequence", "server_time_unix_ms")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    sequence: int
    server_time_unix_ms: int
    def __init__(self, protocol_version: _Optional[int] = ..., sequence: _Optional[int] = ..., server_time_unix_ms: _Optional[int] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "message", "supported_versions", "highest_sequence", "transfer_id", "chunk_index", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    HIGHEST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    supported_versions: _containers.RepeatedScalarFieldContainer[int]
    highest_sequence: int
    transfer_id: bytes
    chunk_index: int
    retry_after_ms: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., supported_versions: _Optional[_Iterable[int]] = ..., highest_sequence: _Optional[int] = ..., transfer_id: _Optional[bytes] = ..., chunk_index: _Optional[int] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("transfer_id", "index", "total_chunks", "total_size", "data", "sha256")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    transfer_id: bytes
    index: int
    total_chunks: int
    total_size: int
    data: bytes
    sha256: bytes
    def __init__(self, transfer_id: _Optional[bytes] = ..., index: _Optional[int] = ..., total_chunks: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "replay_window", "max_chunk_bytes", "max_payload_bytes", "server_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    replay_window: int
    max_chunk_bytes: int
    max_payload_bytes: int
    server_version: str
    def __init__(self, session_id: _Optional[bytes] = ..., replay_window: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_payload_bytes: _Optional[int] = ..., server_version: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("header", "state", "supported_versions", "run_id", "progress", "header_ok", "header_problem", "server_version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    HEADER_OK_FIELD_NUMBER: _ClassVar[int]
    HEADER_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    state: ServingState
    supported_versions: _containers.RepeatedScalarFieldContainer[int]
    run_id: str
    progress: int
    header_ok: bool
    header_problem: str
    server_version: str
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., state: _Optional[_Union[ServingState, str]] = ..., supported_versions: _Optional[_Iterable[int]] = ..., run_id: _Optional[str] = ..., progress: _Optional[int] = ..., header_ok: _Optional[bool] = ..., header_problem: _Optional[str] = ..., server_version: _Optional[str] = ...) -> None: ...

class HeadLayer(_message.Message):
    __slots__ = ("in_features", "out_features")
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    in_features: int
    out_features: int
    def __init__(self, in_features: _Optional[int] = ..., out_features: _Optional[int] = ...) -> None: ...

class SplitHelloRequest(_message.Message):
    __slots__ = ("header", "client_nonce", "context_fingerprint", "feature_dim", "client_version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    client_nonce: bytes
    context_fingerprint: bytes
    feature_dim: int
    client_version: str
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., client_nonce: _Optional[bytes] = ..., context_fingerprint: _Optional[bytes] = ..., feature_dim: _Optional[int] = ..., client_version: _Optional[str] = ...) -> None: ...

class SplitHelloResponse(_message.Message):
    __slots__ = ("header", "session", "mode", "layers", "batch_capacity", "slots", "predict_available", "context_needed", "num_sites", "weights_needed")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BATCH_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PREDICT_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_NEEDED_FIELD_NUMBER: _ClassVar[int]
    NUM_SITES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    session: SessionInfo
    mode: SplitMode
    layers: _containers.RepeatedCompositeFieldContainer[HeadLayer]
    batch_capacity: int
    slots: int
    predict_available: bool
    context_needed: bool
    num_sites: int
    weights_needed: bool
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., session: _Optional[_Union[SessionInfo, _Mapping]] = ..., mode: _Optional[_Union[SplitMode, str]] = ..., layers: _Optional[_Iterable[_Union[HeadLayer, _Mapping]]] = ..., batch_capacity: _Optional[int] = ..., slots: _Optional[int] = ..., predict_available: _Optional[bool] = ..., context_needed: _Optional[bool] = ..., num_sites: _Optional[int] = ..., weights_needed: _Optional[bool] = ...) -> None: ...

class ContextMeta(_message.Message):
    __slots__ = ("context_fingerprint", "galois_keys", "relin_keys")
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    GALOIS_KEYS_FIELD_NUMBER: _ClassVar[int]
    RELIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    context_fingerprint: bytes
    galois_keys: bool
    relin_keys: bool
    def __init__(self, context_fingerprint: _Optional[bytes] = ..., galois_keys: _Optional[bool] = ..., relin_keys: _Optional[bool] = ...) -> None: ...

class UploadContextRequest(_message.Message):
    __slots__ = ("header", "meta", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    meta: ContextMeta
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., meta: _Optional[_Union[ContextMeta, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadContextResponse(_message.Message):
    __slots__ = ("header", "context_fingerprint", "bytes_received")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    context_fingerprint: bytes
    bytes_received: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., context_fingerprint: _Optional[bytes] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class GetTurnRequest(_message.Message):
    __slots__ = ("header", "epoch", "batches_left", "max_wait_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_LEFT_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    epoch: int
    batches_left: int
    max_wait_ms: int
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., epoch: _Optional[int] = ..., batches_left: _Optional[int] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...

class GetTurnResponse(_message.Message):
    __slots__ = ("header", "state", "step", "epoch", "retry_after_ms", "relay_version", "eval_split", "eval_id", "release_epoch", "release_val_auroc")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    RELAY_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVAL_SPLIT_FIELD_NUMBER: _ClassVar[int]
    EVAL_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RELEASE_VAL_AUROC_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    state: TurnState
    step: int
    epoch: int
    retry_after_ms: int
    relay_version: int
    eval_split: str
    eval_id: int
    release_epoch: int
    release_val_auroc: float
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., state: _Optional[_Union[TurnState, str]] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., relay_version: _Optional[int] = ..., eval_split: _Optional[str] = ..., eval_id: _Optional[int] = ..., release_epoch: _Optional[int] = ..., release_val_auroc: _Optional[float] = ...) -> None: ...

class ForwardCall(_message.Message):
    __slots__ = ("step", "part", "layer", "train", "encoding")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    step: int
    part: int
    layer: int
    train: bool
    encoding: PayloadEncoding
    def __init__(self, step: _Optional[int] = ..., part: _Optional[int] = ..., layer: _Optional[int] = ..., train: _Optional[bool] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("header", "call", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    call: ForwardCall
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., call: _Optional[_Union[ForwardCall, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class BackwardCall(_message.Message):
    __slots__ = ("step", "part", "layer", "encoding", "input_grad")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    part: int
    layer: int
    encoding: PayloadEncoding
    input_grad: bool
    def __init__(self, step: _Optional[int] = ..., part: _Optional[int] = ..., layer: _Optional[int] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ..., input_grad: _Optional[bool] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("header", "call", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    call: BackwardCall
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., call: _Optional[_Union[BackwardCall, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("header", "chunk", "refresh_needed")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    REFRESH_NEEDED_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    chunk: Chunk
    refresh_needed: bool
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., refresh_needed: _Optional[bool] = ...) -> None: ...

class PredictCall(_message.Message):
    __slots__ = ("part", "encoding")
    PART_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    part: int
    encoding: PayloadEncoding
    def __init__(self, part: _Optional[int] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("header", "call", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    call: PredictCall
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., call: _Optional[_Union[PredictCall, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ApplyUpdateCall(_message.Message):
    __slots__ = ("step", "encoding")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    step: int
    encoding: PayloadEncoding
    def __init__(self, step: _Optional[int] = ..., encoding: _Optional[_Union[PayloadEncoding, str]] = ...) -> None: ...

class ApplyUpdateRequest(_message.Message):
    __slots__ = ("header", "call", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    call: ApplyUpdateCall
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., call: _Optional[_Union[ApplyUpdateCall, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ApplyUpdateResponse(_message.Message):
    __slots__ = ("header", "step")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    step: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., step: _Optional[int] = ...) -> None: ...

class EndEpochRequest(_message.Message):
    __slots__ = ("header", "epoch", "loss_sum", "samples", "epsilon")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    epoch: int
    loss_sum: float
    samples: int
    epsilon: float
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., epoch: _Optional[int] = ..., loss_sum: _Optional[float] = ..., samples: _Optional[int] = ..., epsilon: _Optional[float] = ...) -> None: ...

class EndEpochResponse(_message.Message):
    __slots__ = ("header", "epoch", "epoch_closed", "sites_pending")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_CLOSED_FIELD_NUMBER: _ClassVar[int]
    SITES_PENDING_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    epoch: int
    epoch_closed: bool
    sites_pending: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., epoch: _Optional[int] = ..., epoch_closed: _Optional[bool] = ..., sites_pending: _Optional[int] = ...) -> None: ...

class RelayMeta(_message.Message):
    __slots__ = ("step", "version")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    step: int
    version: int
    def __init__(self, step: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class UploadRelayRequest(_message.Message):
    __slots__ = ("header", "meta", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    meta: RelayMeta
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., meta: _Optional[_Union[RelayMeta, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadRelayResponse(_message.Message):
    __slots__ = ("header", "version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    version: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class DownloadRelayRequest(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ...) -> None: ...

class DownloadRelayResponse(_message.Message):
    __slots__ = ("header", "version", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    version: int
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., version: _Optional[int] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ReportEvalRequest(_message.Message):
    __slots__ = ("header", "eval_id", "metrics_json")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EVAL_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    eval_id: int
    metrics_json: str
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., eval_id: _Optional[int] = ..., metrics_json: _Optional[str] = ...) -> None: ...

class ReportEvalResponse(_message.Message):
    __slots__ = ("header", "accepted")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    accepted: bool
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., accepted: _Optional[bool] = ...) -> None: ...

class WeightsMeta(_message.Message):
    __slots__ = ("purpose", "step")
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    purpose: WeightsPurpose
    step: int
    def __init__(self, purpose: _Optional[_Union[WeightsPurpose, str]] = ..., step: _Optional[int] = ...) -> None: ...

class UploadWeightsRequest(_message.Message):
    __slots__ = ("header", "meta", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    meta: WeightsMeta
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., meta: _Optional[_Union[WeightsMeta, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadWeightsResponse(_message.Message):
    __slots__ = ("header", "updates", "refreshes")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    REFRESHES_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    updates: int
    refreshes: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., updates: _Optional[int] = ..., refreshes: _Optional[int] = ...) -> None: ...

class DownloadWeightsRequest(_message.Message):
    __slots__ = ("header", "purpose", "step", "eval_id")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_ID_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    purpose: WeightsPurpose
    step: int
    eval_id: int
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., purpose: _Optional[_Union[WeightsPurpose, str]] = ..., step: _Optional[int] = ..., eval_id: _Optional[int] = ...) -> None: ...

class DownloadWeightsResponse(_message.Message):
    __slots__ = ("header", "updates", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    updates: int
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., updates: _Optional[int] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("header", "client_nonce", "sample_count", "context_fingerprint", "want_public_context", "client_version")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WANT_PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    client_nonce: bytes
    sample_count: int
    context_fingerprint: bytes
    want_public_context: bool
    client_version: str
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., client_nonce: _Optional[bytes] = ..., sample_count: _Optional[int] = ..., context_fingerprint: _Optional[bytes] = ..., want_public_context: _Optional[bool] = ..., client_version: _Optional[str] = ...) -> None: ...

class FedRunInfo(_message.Message):
    __slots__ = ("session", "regime", "rounds_total", "num_sites", "secure", "model_size", "he_encrypted_length", "he_value_bound", "context_fingerprint", "public_context_size")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REGIME_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_SITES_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    HE_ENCRYPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HE_VALUE_BOUND_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    regime: str
    rounds_total: int
    num_sites: int
    secure: SecureMode
    model_size: int
    he_encrypted_length: int
    he_value_bound: float
    context_fingerprint: bytes
    public_context_size: int
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., regime: _Optional[str] = ..., rounds_total: _Optional[int] = ..., num_sites: _Optional[int] = ..., secure: _Optional[_Union[SecureMode, str]] = ..., model_size: _Optional[int] = ..., he_encrypted_length: _Optional[int] = ..., he_value_bound: _Optional[float] = ..., context_fingerprint: _Optional[bytes] = ..., public_context_size: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("header", "run", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    run: FedRunInfo
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., run: _Optional[_Union[FedRunInfo, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("header", "min_round", "max_wait_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MIN_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    min_round: int
    max_wait_ms: int
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., min_round: _Optional[int] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...

class PayloadDescriptor(_message.Message):
    __slots__ = ("part", "round", "size", "sha256")
    PART_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    part: ModelPart
    round: int
    size: int
    sha256: bytes
    def __init__(self, part: _Optional[_Union[ModelPart, str]] = ..., round: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class UpdateOutcome(_message.Message):
    __slots__ = ("round", "accepted", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: bool
    reason: str
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("header", "round", "state", "sampled", "lr", "local_epochs", "mu", "deadline_unix_ms", "downloads", "secagg_next", "retry_after_ms", "last_outcome", "decrypt_aggregate", "he_value_bound")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOADS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_NEXT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DECRYPT_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    HE_VALUE_BOUND_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    round: int
    state: RoundState
    sampled: bool
    lr: float
    local_epochs: int
    mu: float
    deadline_unix_ms: int
    downloads: _containers.RepeatedCompositeFieldContainer[PayloadDescriptor]
    secagg_next: SecAggMessageType
    retry_after_ms: int
    last_outcome: UpdateOutcome
    decrypt_aggregate: bool
    he_value_bound: float
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., round: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., sampled: _Optional[bool] = ..., lr: _Optional[float] = ..., local_epochs: _Optional[int] = ..., mu: _Optional[float] = ..., deadline_unix_ms: _Optional[int] = ..., downloads: _Optional[_Iterable[_Union[PayloadDescriptor, _Mapping]]] = ..., secagg_next: _Optional[_Union[SecAggMessageType, str]] = ..., retry_after_ms: _Optional[int] = ..., last_outcome: _Optional[_Union[UpdateOutcome, _Mapping]] = ..., decrypt_aggregate: _Optional[bool] = ..., he_value_bound: _Optional[float] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("header", "round", "part")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    round: int
    part: ModelPart
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., round: _Optional[int] = ..., part: _Optional[_Union[ModelPart, str]] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("header", "descriptor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    descriptor: PayloadDescriptor
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., descriptor: _Optional[_Union[PayloadDescriptor, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("encoding", "transfer_id", "size")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    encoding: UpdateEncoding
    transfer_id: bytes
    size: int
    def __init__(self, encoding: _Optional[_Union[UpdateEncoding, str]] = ..., transfer_id: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class UpdateMeta(_message.Message):
    __slots__ = ("round", "sample_count", "parts", "train_loss", "epsilon")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    round: int
    sample_count: int
    parts: _containers.RepeatedCompositeFieldContainer[UpdatePart]
    train_loss: float
    epsilon: float
    def __init__(self, round: _Optional[int] = ..., sample_count: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[UpdatePart, _Mapping]]] = ..., train_loss: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "meta", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    meta: UpdateMeta
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., meta: _Optional[_Union[UpdateMeta, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("header", "accepted", "reason", "bytes_received")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    accepted: bool
    reason: str
    bytes_received: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class SecAggSubmitMeta(_message.Message):
    __slots__ = ("round", "type", "sample_count", "train_loss", "epsilon")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    round: int
    type: SecAggMessageType
    sample_count: int
    train_loss: float
    epsilon: float
    def __init__(self, round: _Optional[int] = ..., type: _Optional[_Union[SecAggMessageType, str]] = ..., sample_count: _Optional[int] = ..., train_loss: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class SecAggSubmitRequest(_message.Message):
    __slots__ = ("header", "meta", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    meta: SecAggSubmitMeta
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., meta: _Optional[_Union[SecAggSubmitMeta, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SecAggSubmitResponse(_message.Message):
    __slots__ = ("header", "accepted", "reason")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    accepted: bool
    reason: str
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SecAggFetchRequest(_message.Message):
    __slots__ = ("header", "round", "type", "max_wait_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    header: RequestHeader
    round: int
    type: SecAggMessageType
    max_wait_ms: int
    def __init__(self, header: _Optional[_Union[RequestHeader, _Mapping]] = ..., round: _Optional[int] = ..., type: _Optional[_Union[SecAggMessageType, str]] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...

class SecAggFetchStatus(_message.Message):
    __slots__ = ("ready", "retry_after_ms")
    READY_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    retry_after_ms: int
    def __init__(self, ready: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class SecAggFetchResponse(_message.Message):
    __slots__ = ("header", "status", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    status: SecAggFetchStatus
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., status: _Optional[_Union[SecAggFetchStatus, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...
