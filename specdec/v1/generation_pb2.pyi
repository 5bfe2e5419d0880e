from specdec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRAFT_POLICY_UNSPECIFIED: _ClassVar[DraftPolicy]
    DRAFT_POLICY_STATIC: _ClassVar[DraftPolicy]
    DRAFT_POLICY_HEURISTIC: _ClassVar[DraftPolicy]
    DRAFT_POLICY_PEARL: _ClassVar[DraftPolicy]
    DRAFT_POLICY_ADAEDL: _ClassVar[DraftPolicy]
    DRAFT_POLICY_SPECDECPP: _ClassVar[DraftPolicy]
    DRAFT_POLICY_BILD: _ClassVar[DraftPolicy]
    DRAFT_POLICY_GOODPUT: _ClassVar[DraftPolicy]
    DRAFT_POLICY_SMARTSPEC: _ClassVar[DraftPolicy]
    DRAFT_POLICY_MARGINAL: _ClassVar[DraftPolicy]

class PipelineMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIPELINE_MODE_UNSPECIFIED: _ClassVar[PipelineMode]
    PIPELINE_MODE_SEQUENTIAL: _ClassVar[PipelineMode]
    PIPELINE_MODE_OVERLAPPED: _ClassVar[PipelineMode]
    PIPELINE_MODE_TARGET_ONLY: _ClassVar[PipelineMode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
DRAFT_POLICY_UNSPECIFIED: DraftPolicy
DRAFT_POLICY_STATIC: DraftPolicy
DRAFT_POLICY_HEURISTIC: DraftPolicy
DRAFT_POLICY_PEARL: DraftPolicy
DRAFT_POLICY_ADAEDL: DraftPolicy
DRAFT_POLICY_SPECDECPP: DraftPolicy
DRAFT_POLICY_BILD: DraftPolicy
DRAFT_POLICY_GOODPUT: DraftPolicy
DRAFT_POLICY_SMARTSPEC: DraftPolicy
DRAFT_POLICY_MARGINAL: DraftPolicy
PIPELINE_MODE_UNSPECIFIED: PipelineMode
PIPELINE_MODE_SEQUENTIAL: PipelineMode
PIPELINE_MODE_OVERLAPPED: PipelineMode
PIPELINE_MODE_TARGET_ONLY: PipelineMode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "token_ids", "max_new_tokens", "sampling", "stop", "stop_token_ids", "raw", "policy", "mode", "draft_length", "policy_threshold", "bild_rollback_threshold", "exclude_from_training", "request_id", "ignore_eos")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    POLICY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BILD_ROLLBACK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FROM_TRAINING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: ChatMessages
    token_ids: TokenIds
    max_new_tokens: int
    sampling: _common_pb2.SamplingParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    raw: bool
    policy: DraftPolicy
    mode: PipelineMode
    draft_length: int
    policy_threshold: float
    bild_rollback_threshold: float
    exclude_from_training: bool
    request_id: str
    ignore_eos: bool
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., raw: _Optional[bool] = ..., policy: _Optional[_Union[DraftPolicy, str]] = ..., mode: _Optional[_Union[PipelineMode, str]] = ..., draft_length: _Optional[int] = ..., policy_threshold: _Optional[float] = ..., bild_rollback_threshold: _Optional[float] = ..., exclude_from_training: _Optional[bool] = ..., request_id: _Optional[str] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("prompt_tokens", "new_tokens", "rounds", "drafted_tokens", "accepted_tokens", "acceptance_rate", "mean_accepted_length", "ttft_ms", "total_ms", "tokens_per_s", "fallback_steps", "draft_ms", "verify_ms", "hidden_draft_ms", "policy", "mode", "lossy", "drafter_version", "stale_draft_tokens", "speculation_off_rounds", "early_verify_rounds", "lookup_rounds", "lookup_drafted_tokens", "lookup_accepted_tokens", "mean_block_length", "feature_catch_up_rounds")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    STALE_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_OFF_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EARLY_VERIFY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BLOCK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FEATURE_CATCH_UP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    new_tokens: int
    rounds: int
    drafted_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    mean_accepted_length: float
    ttft_ms: float
    total_ms: float
    tokens_per_s: float
    fallback_steps: int
    draft_ms: float
    verify_ms: float
    hidden_draft_ms: float
    policy: str
    mode: str
    lossy: bool
    drafter_version: str
    stale_draft_tokens: int
    speculation_off_rounds: int
    early_verify_rounds: int
    lookup_rounds: int
    lookup_drafted_tokens: int
    lookup_accepted_tokens: int
    mean_block_length: float
    feature_catch_up_rounds: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., rounds: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., mean_accepted_length: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., fallback_steps: _Optional[int] = ..., draft_ms: _Optional[float] = ..., verify_ms: _Optional[float] = ..., hidden_draft_ms: _Optional[float] = ..., policy: _Optional[str] = ..., mode: _Optional[str] = ..., lossy: _Optional[bool] = ..., drafter_version: _Optional[str] = ..., stale_draft_tokens: _Optional[int] = ..., speculation_off_rounds: _Optional[int] = ..., early_verify_rounds: _Optional[int] = ..., lookup_rounds: _Optional[int] = ..., lookup_drafted_tokens: _Optional[int] = ..., lookup_accepted_tokens: _Optional[int] = ..., mean_block_length: _Optional[float] = ..., feature_catch_up_rounds: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    stats: GenerationStats
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "text", "done", "finish_reason", "stats", "request_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    done: bool
    finish_reason: FinishReason
    stats: GenerationStats
    request_id: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...
