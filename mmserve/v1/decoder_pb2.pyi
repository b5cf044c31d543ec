from mmserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MediaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_KIND_UNSPECIFIED: _ClassVar[MediaKind]
    MEDIA_KIND_IMAGE: _ClassVar[MediaKind]
    MEDIA_KIND_VIDEO: _ClassVar[MediaKind]
MEDIA_KIND_UNSPECIFIED: MediaKind
MEDIA_KIND_IMAGE: MediaKind
MEDIA_KIND_VIDEO: MediaKind

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "kind", "data", "uri", "fps", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels", "chunk_frames", "chunk_indices", "max_chunks_ahead", "file_size", "file_mtime_ns")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MIN_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PIXELS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDICES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNKS_AHEAD_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILE_MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: MediaKind
    data: bytes
    uri: str
    fps: float
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int
    total_pixels: int
    chunk_frames: int
    chunk_indices: _containers.RepeatedScalarFieldContainer[int]
    max_chunks_ahead: int
    file_size: int
    file_mtime_ns: int
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[MediaKind, str]] = ..., data: _Optional[bytes] = ..., uri: _Optional[str] = ..., fps: _Optional[float] = ..., min_frames: _Optional[int] = ..., max_frames: _Optional[int] = ..., min_pixels: _Optional[int] = ..., max_pixels: _Optional[int] = ..., total_pixels: _Optional[int] = ..., chunk_frames: _Optional[int] = ..., chunk_indices: _Optional[_Iterable[int]] = ..., max_chunks_ahead: _Optional[int] = ..., file_size: _Optional[int] = ..., file_mtime_ns: _Optional[int] = ...) -> None: ...

class DecodeChunk(_message.Message):
    __slots__ = ("chunk_index", "num_chunks", "frames", "frame_indices", "sample_fps", "decode_ms", "video_fps", "grid")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDICES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FPS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    num_chunks: int
    frames: _tensor_pb2.TensorRef
    frame_indices: _containers.RepeatedScalarFieldContainer[int]
    sample_fps: float
    decode_ms: float
    video_fps: float
    grid: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, chunk_index: _Optional[int] = ..., num_chunks: _Optional[int] = ..., frames: _Optional[_Union[_tensor_pb2.TensorRef, _Mapping]] = ..., frame_indices: _Optional[_Iterable[int]] = ..., sample_fps: _Optional[float] = ..., decode_ms: _Optional[float] = ..., video_fps: _Optional[float] = ..., grid: _Optional[_Iterable[int]] = ...) -> None: ...
