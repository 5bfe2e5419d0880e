from specdec.v1 import common_pb2 as _common_pb2
from specdec.v1 import verifier_pb2 as _verifier_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_RULE_UNSPECIFIED: _ClassVar[StopRule]
    STOP_RULE_ENTROPY: _ClassVar[StopRule]
    STOP_RULE_CONFIDENCE: _ClassVar[StopRule]
    STOP_RULE_MIN_CONFIDENCE: _ClassVar[StopRule]
STOP_RULE_UNSPECIFIED: StopRule
STOP_RULE_ENTROPY: StopRule
STOP_RULE_CONFIDENCE: StopRule
STOP_RULE_MIN_CONFIDENCE: StopRule

class DraftRequest(_message.Message):
    __slots__ = ("session_id", "base_len", "tokens", "max_tokens", "sampling", "stop_rule", "stop_threshold", "request_id", "hidden", "committed_len")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_RULE_FIELD_NUMBER: _ClassVar[int]
    STOP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    base_len: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    stop_rule: StopRule
    stop_threshold: float
    request_id: str
    hidden: _common_pb2.HiddenStates
    committed_len: int
    def __init__(self, session_id: _Optional[str] = ..., base_len: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stop_rule: _Optional[_Union[StopRule, str]] = ..., stop_threshold: _Optional[float] = ..., request_id: _Optional[str] = ..., hidden: _Optional[_Union[_common_pb2.HiddenStates, _Mapping]] = ..., committed_len: _Optional[int] = ...) -> None: ...

class DraftToken(_message.Message):
    __slots__ = ("token", "probs", "confidence", "entropy", "accept_prob", "drafter_version")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_PROB_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    token: int
    probs: _common_pb2.DraftProbs
    confidence: float
    entropy: float
    accept_prob: float
    drafter_version: str
    def __init__(self, token: _Optional[int] = ..., probs: _Optional[_Union[_common_pb2.DraftProbs, _Mapping]] = ..., confidence: _Optional[float] = ..., entropy: _Optional[float] = ..., accept_prob: _Optional[float] = ..., drafter_version: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("session_id", "length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    length: int
    def __init__(self, session_id: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...
