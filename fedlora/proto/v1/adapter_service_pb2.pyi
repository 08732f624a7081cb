from fedlora.proto.v1 import adapter_pb2 as _adapter_pb2
from fedlora.proto.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetAdapterRequest(_message.Message):
    __slots__ = ("run", "compression", "merged")
    RUN_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    run: str
    compression: _adapter_pb2.Compression
    merged: bool
    def __init__(self, run: _Optional[str] = ..., compression: _Optional[_Union[_adapter_pb2.Compression, str]] = ..., merged: _Optional[bool] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("index", "total", "data", "total_bytes", "sha256", "round")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    index: int
    total: int
    data: bytes
    total_bytes: int
    sha256: bytes
    round: int
    def __init__(self, index: _Optional[int] = ..., total: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., round: _Optional[int] = ...) -> None: ...

class GetRoundMetricsRequest(_message.Message):
    __slots__ = ("run", "since_round")
    RUN_FIELD_NUMBER: _ClassVar[int]
    SINCE_ROUND_FIELD_NUMBER: _ClassVar[int]
    run: str
    since_round: int
    def __init__(self, run: _Optional[str] = ..., since_round: _Optional[int] = ...) -> None: ...

class RoundMetrics(_message.Message):
    __slots__ = ("run", "rounds")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    run: str
    rounds: _containers.RepeatedCompositeFieldContainer[_run_pb2.RoundSummary]
    def __init__(self, run: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[_run_pb2.RoundSummary, _Mapping]]] = ...) -> None: ...

class GetPrivacyReportRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...
