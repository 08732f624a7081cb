from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundSummary(_message.Message):
    __slots__ = ("round", "strategy", "clients", "train_loss", "eval_loss", "agg_error", "bytes_up", "bytes_down", "epsilon", "seconds", "rejected", "client_eval_loss", "eval_bytes_down", "eval_bytes_up", "extra_json")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    AGG_ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    EVAL_BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    round: int
    strategy: str
    clients: int
    train_loss: float
    eval_loss: float
    agg_error: float
    bytes_up: int
    bytes_down: int
    epsilon: float
    seconds: float
    rejected: int
    client_eval_loss: float
    eval_bytes_down: int
    eval_bytes_up: int
    extra_json: str
    def __init__(self, round: _Optional[int] = ..., strategy: _Optional[str] = ..., clients: _Optional[int] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., agg_error: _Optional[float] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., epsilon: _Optional[float] = ..., seconds: _Optional[float] = ..., rejected: _Optional[int] = ..., client_eval_loss: _Optional[float] = ..., eval_bytes_down: _Optional[int] = ..., eval_bytes_up: _Optional[int] = ..., extra_json: _Optional[str] = ...) -> None: ...

class ClientPrivacy(_message.Message):
    __slots__ = ("client", "epsilon", "delta", "sigma", "sample_rate", "steps", "epsilon_prv", "rounds", "num_examples")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PRV_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    client: str
    epsilon: float
    delta: float
    sigma: float
    sample_rate: float
    steps: int
    epsilon_prv: float
    rounds: int
    num_examples: int
    def __init__(self, client: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., sigma: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., epsilon_prv: _Optional[float] = ..., rounds: _Optional[int] = ..., num_examples: _Optional[int] = ...) -> None: ...

class PrivacyReport(_message.Message):
    __slots__ = ("unit", "accountant", "clients", "worst_client", "worst_epsilon", "delta", "statement", "report_json")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    WORST_CLIENT_FIELD_NUMBER: _ClassVar[int]
    WORST_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STATEMENT_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    unit: str
    accountant: str
    clients: _containers.RepeatedCompositeFieldContainer[ClientPrivacy]
    worst_client: str
    worst_epsilon: float
    delta: float
    statement: str
    report_json: str
    def __init__(self, unit: _Optional[str] = ..., accountant: _Optional[str] = ..., clients: _Optional[_Iterable[_Union[ClientPrivacy, _Mapping]]] = ..., worst_client: _Optional[str] = ..., worst_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., statement: _Optional[str] = ..., report_json: _Optional[str] = ...) -> None: ...
