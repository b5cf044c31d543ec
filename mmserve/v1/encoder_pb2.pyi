from mmserve.v1 import decoder_pb2 as _decoder_pb2
from mmserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "kind", "frames", "cache", "grid")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: _decoder_pb2.MediaKind
    frames: _tensor_pb2.TensorRef
    cache: CacheSlot
    grid: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[_decoder_pb2.MediaKind, str]] = ..., frames: _Optional[_Union[_tensor_pb2.TensorRef, _Mapping]] = ..., cache: _Optional[_Union[CacheSlot, _Mapping]] = ..., grid: _Optional[_Iterable[int]] = ...) -> None: ...

class CacheSlot(_message.Message):
    __slots__ = ("key", "chunk_index", "num_chunks", "second_per_grid_t", "first_frame", "num_frames", "timestamps")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SECOND_PER_GRID_T_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    key: str
    chunk_index: int
    num_chunks: int
    second_per_grid_t: float
    first_frame: int
    num_frames: int
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, key: _Optional[str] = ..., chunk_index: _Optional[int] = ..., num_chunks: _Optional[int] = ..., second_per_grid_t: _Optional[float] = ..., first_frame: _Optional[int] = ..., num_frames: _Optional[int] = ..., timestamps: _Optional[_Iterable[float]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("embeddings", "grid_thw", "encode_ms", "work_ms")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    WORK_MS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _tensor_pb2.TensorRef
    grid_thw: _containers.RepeatedScalarFieldContainer[int]
    encode_ms: float
    work_ms: float
    def __init__(self, embeddings: _Optional[_Union[_tensor_pb2.TensorRef, _Mapping]] = ..., grid_thw: _Optional[_Iterable[int]] = ..., encode_ms: _Optional[float] = ..., work_ms: _Optional[float] = ...) -> None: ...
