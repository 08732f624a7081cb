from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_FP16: _ClassVar[Compression]
    COMPRESSION_BF16: _ClassVar[Compression]
    COMPRESSION_INT8_ABSMAX: _ClassVar[Compression]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType
COMPRESSION_NONE: Compression
COMPRESSION_FP16: Compression
COMPRESSION_BF16: Compression
COMPRESSION_INT8_ABSMAX: Compression

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data", "compression", "scales", "scale_dim")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    SCALE_DIM_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    compression: Compression
    scales: _containers.RepeatedScalarFieldContainer[float]
    scale_dim: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., scales: _Optional[_Iterable[float]] = ..., scale_dim: _Optional[int] = ...) -> None: ...

class LoraFactors(_message.Message):
    __slots__ = ("name", "rank", "scale", "a", "b")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    name: str
    rank: int
    scale: float
    a: Tensor
    b: Tensor
    def __init__(self, name: _Optional[str] = ..., rank: _Optional[int] = ..., scale: _Optional[float] = ..., a: _Optional[_Union[Tensor, _Mapping]] = ..., b: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BaseTerm(_message.Message):
    __slots__ = ("factors", "dense")
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    factors: LoraFactors
    dense: DenseTerm
    def __init__(self, factors: _Optional[_Union[LoraFactors, _Mapping]] = ..., dense: _Optional[_Union[DenseTerm, _Mapping]] = ...) -> None: ...

class DenseTerm(_message.Message):
    __slots__ = ("weight", "scale")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    weight: Tensor
    scale: float
    def __init__(self, weight: _Optional[_Union[Tensor, _Mapping]] = ..., scale: _Optional[float] = ...) -> None: ...

class LayerBaseTerms(_message.Message):
    __slots__ = ("name", "terms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    terms: _containers.RepeatedCompositeFieldContainer[BaseTerm]
    def __init__(self, name: _Optional[str] = ..., terms: _Optional[_Iterable[_Union[BaseTerm, _Mapping]]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("null_value", "bool_value", "int_value", "double_value", "string_value", "tensor_value", "factors_value", "list_value", "map_value")
    NULL_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    FACTORS_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAP_VALUE_FIELD_NUMBER: _ClassVar[int]
    null_value: Null
    bool_value: bool
    int_value: int
    double_value: float
    string_value: str
    tensor_value: Tensor
    factors_value: LoraFactors
    list_value: ValueList
    map_value: ValueMap
    def __init__(self, null_value: _Optional[_Union[Null, _Mapping]] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., double_value: _Optional[float] = ..., string_value: _Optional[str] = ..., tensor_value: _Optional[_Union[Tensor, _Mapping]] = ..., factors_value: _Optional[_Union[LoraFactors, _Mapping]] = ..., list_value: _Optional[_Union[ValueList, _Mapping]] = ..., map_value: _Optional[_Union[ValueMap, _Mapping]] = ...) -> None: ...

class Null(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class ValueMap(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[MapEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[MapEntry, _Mapping]]] = ...) -> None: ...

class MapEntry(_message.Message):
    __slots__ = ("string_key", "int_key", "value")
    STRING_KEY_FIELD_NUMBER: _ClassVar[int]
    INT_KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    string_key: str
    int_key: int
    value: Value
    def __init__(self, string_key: _Optional[str] = ..., int_key: _Optional[int] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("run", "round", "strategy", "base_model", "lora_alpha", "use_rslora", "merged", "compression", "layers", "base_terms", "extras", "fedlora_version")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BASE_TERMS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    FEDLORA_VERSION_FIELD_NUMBER: _ClassVar[int]
    run: str
    round: int
    strategy: str
    base_model: str
    lora_alpha: float
    use_rslora: bool
    merged: bool
    compression: Compression
    layers: _containers.RepeatedCompositeFieldContainer[LoraFactors]
    base_terms: _containers.RepeatedCompositeFieldContainer[LayerBaseTerms]
    extras: ValueMap
    fedlora_version: str
    def __init__(self, run: _Optional[str] = ..., round: _Optional[int] = ..., strategy: _Optional[str] = ..., base_model: _Optional[str] = ..., lora_alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., merged: _Optional[bool] = ..., compression: _Optional[_Union[Compression, str]] = ..., layers: _Optional[_Iterable[_Union[LoraFactors, _Mapping]]] = ..., base_terms: _Optional[_Iterable[_Union[LayerBaseTerms, _Mapping]]] = ..., extras: _Optional[_Union[ValueMap, _Mapping]] = ..., fedlora_version: _Optional[str] = ...) -> None: ...
