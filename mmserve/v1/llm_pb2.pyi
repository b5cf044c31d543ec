from mmserve.v1 import api_pb2 as _api_pb2
from mmserve.v1 import decoder_pb2 as _decoder_pb2
from mmserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LlmInput(_message.Message):
    __slots__ = ("request", "chunk")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    request: LlmRequest
    chunk: MediaChunk
    def __init__(self, request: _Optional[_Union[LlmRequest, _Mapping]] = ..., chunk: _Optional[_Union[MediaChunk, _Mapping]] = ...) -> None: ...

class MediaChunk(_message.Message):
    __slots__ = ("media_index", "chunk_index", "embeddings")
    MEDIA_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    media_index: int
    chunk_index: int
    embeddings: _tensor_pb2.TensorRef
    def __init__(self, media_index: _Optional[int] = ..., chunk_index: _Optional[int] = ..., embeddings: _Optional[_Union[_tensor_pb2.TensorRef, _Mapping]] = ...) -> None: ...

class LlmRequest(_message.Message):
    __slots__ = ("request_id", "messages", "sampling", "priority", "tpot_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    messages: _containers.RepeatedCompositeFieldContainer[LlmMessage]
    sampling: _api_pb2.SamplingParams
    priority: float
    tpot_ms: float
    def __init__(self, request_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[LlmMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_api_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[float] = ..., tpot_ms: _Optional[float] = ...) -> None: ...

class LlmMessage(_message.Message):
    __slots__ = ("role", "parts")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    parts: _containers.RepeatedCompositeFieldContainer[LlmPart]
    def __init__(self, role: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[LlmPart, _Mapping]]] = ...) -> None: ...

class LlmPart(_message.Message):
    __slots__ = ("text", "media")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    text: str
    media: MediaEmbedding
    def __init__(self, text: _Optional[str] = ..., media: _Optional[_Union[MediaEmbedding, _Mapping]] = ...) -> None: ...

class MediaEmbedding(_message.Message):
    __slots__ = ("kind", "embeddings", "grid_thw", "second_per_grid_t", "cache_keys", "timestamps", "chunk_rows", "digest")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    SECOND_PER_GRID_T_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEYS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    kind: _decoder_pb2.MediaKind
    embeddings: _tensor_pb2.TensorRef
    grid_thw: _containers.RepeatedScalarFieldContainer[int]
    second_per_grid_t: float
    cache_keys: _containers.RepeatedScalarFieldContainer[str]
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    chunk_rows: _containers.RepeatedScalarFieldContainer[int]
    digest: str
    def __init__(self, kind: _Optional[_Union[_decoder_pb2.MediaKind, str]] = ..., embeddings: _Optional[_Union[_tensor_pb2.TensorRef, _Mapping]] = ..., grid_thw: _Optional[_Iterable[int]] = ..., second_per_grid_t: _Optional[float] = ..., cache_keys: _Optional[_Iterable[str]] = ..., timestamps: _Optional[_Iterable[float]] = ..., chunk_rows: _Optional[_Iterable[int]] = ..., digest: _Optional[str] = ...) -> None: ...

class LlmResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: _api_pb2.Delta
    final: LlmFinal
    def __init__(self, delta: _Optional[_Union[_api_pb2.Delta, _Mapping]] = ..., final: _Optional[_Union[LlmFinal, _Mapping]] = ...) -> None: ...

class LlmFinal(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "queue_ms", "prefill_ms", "ttft_ms", "decode_batch")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_batch: float
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., decode_batch: _Optional[float] = ...) -> None: ...
