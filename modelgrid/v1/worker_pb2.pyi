from modelgrid.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadStageRequest(_message.Message):
    __slots__ = ("model", "version", "start_layer", "end_layer", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    start_layer: int
    end_layer: int
    epoch: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class LoadStageResponse(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: _common_pb2.LoadedStage
    def __init__(self, stage: _Optional[_Union[_common_pb2.LoadedStage, _Mapping]] = ...) -> None: ...

class UnloadStageRequest(_message.Message):
    __slots__ = ("model", "version", "start_layer", "end_layer", "epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    start_layer: int
    end_layer: int
    epoch: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class UnloadStageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "model", "version", "start_layer", "end_layer", "epoch", "tokens", "hidden", "position", "reset", "sampling", "step", "attention_mask", "tokens_shape", "max_session_tokens", "num_stages", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: str
    start_layer: int
    end_layer: int
    epoch: int
    tokens: _common_pb2.TokenIds
    hidden: _common_pb2.Tensor
    position: int
    reset: bool
    sampling: _common_pb2.SamplingParams
    step: int
    attention_mask: _common_pb2.Tensor
    tokens_shape: _containers.RepeatedScalarFieldContainer[int]
    max_session_tokens: int
    num_stages: int
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., epoch: _Optional[int] = ..., tokens: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., position: _Optional[int] = ..., reset: _Optional[bool] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., step: _Optional[int] = ..., attention_mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., tokens_shape: _Optional[_Iterable[int]] = ..., max_session_tokens: _Optional[int] = ..., num_stages: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "token", "embeddings", "cache_length")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    hidden: _common_pb2.Tensor
    token: SampledToken
    embeddings: _common_pb2.Tensor
    cache_length: int
    def __init__(self, hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., token: _Optional[_Union[SampledToken, _Mapping]] = ..., embeddings: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., cache_length: _Optional[int] = ...) -> None: ...

class ForwardBatchRequest(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[ForwardRequest]
    def __init__(self, steps: _Optional[_Iterable[_Union[ForwardRequest, _Mapping]]] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("index", "response", "code", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    response: ForwardResponse
    code: str
    message: str
    def __init__(self, index: _Optional[int] = ..., response: _Optional[_Union[ForwardResponse, _Mapping]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ForwardResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ForwardResult, _Mapping]]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
