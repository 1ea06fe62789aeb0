from pdserve.v1 import logprobs_pb2 as _logprobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_AGGREGATED: _ClassVar[WorkerRole]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_AGGREGATED: WorkerRole
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos", "min_tokens", "logprobs", "prompt_logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    min_tokens: int
    logprobs: int
    prompt_logprobs: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., min_tokens: _Optional[int] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[bool] = ...) -> None: ...

class KVEndpoint(_message.Message):
    __slots__ = ("backend", "address")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    address: bytes
    def __init__(self, backend: _Optional[str] = ..., address: _Optional[bytes] = ...) -> None: ...

class ReserveKVRequest(_message.Message):
    __slots__ = ("req_id", "num_prompt_tokens", "backend", "prompt_token_ids")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    num_prompt_tokens: int
    backend: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, req_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., backend: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReserveKVResponse(_message.Message):
    __slots__ = ("endpoint", "transfer_id", "lease_s", "transfer_token", "num_cached_tokens")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    endpoint: KVEndpoint
    transfer_id: int
    lease_s: float
    transfer_token: bytes
    num_cached_tokens: int
    def __init__(self, endpoint: _Optional[_Union[KVEndpoint, _Mapping]] = ..., transfer_id: _Optional[int] = ..., lease_s: _Optional[float] = ..., transfer_token: _Optional[bytes] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("req_id", "prompt_token_ids", "sampling", "target", "transfer_id", "ttft_slo_ms", "resume_output_token_ids", "transfer_token", "skip_kv_tokens")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SKIP_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    target: KVEndpoint
    transfer_id: int
    ttft_slo_ms: float
    resume_output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    transfer_token: bytes
    skip_kv_tokens: int
    def __init__(self, req_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., target: _Optional[_Union[KVEndpoint, _Mapping]] = ..., transfer_id: _Optional[int] = ..., ttft_slo_ms: _Optional[float] = ..., resume_output_token_ids: _Optional[_Iterable[int]] = ..., transfer_token: _Optional[bytes] = ..., skip_kv_tokens: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("req_id", "first_token_id", "prefill_ms", "kv_bytes", "transfer_tail_ms", "num_cached_tokens")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TAIL_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    first_token_id: int
    prefill_ms: float
    kv_bytes: int
    transfer_tail_ms: float
    num_cached_tokens: int
    def __init__(self, req_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., prefill_ms: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., transfer_tail_ms: _Optional[float] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("req_id", "prompt_token_ids", "sampling", "remote_prefill", "ttft_slo_ms", "resume_output_token_ids")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PREFILL_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    RESUME_OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    remote_prefill: bool
    ttft_slo_ms: float
    resume_output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, req_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., remote_prefill: _Optional[bool] = ..., ttft_slo_ms: _Optional[float] = ..., resume_output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("req_id", "token_ids", "text", "finish_reason", "num_prompt_tokens", "num_generated_tokens", "kv_transfer_bytes", "prefill_ms", "logprobs", "prompt_logprobs", "num_cached_tokens")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_generated_tokens: int
    kv_transfer_bytes: int
    prefill_ms: float
    logprobs: _containers.RepeatedCompositeFieldContainer[_logprobs_pb2.TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_logprobs_pb2.TokenLogprob]
    num_cached_tokens: int
    def __init__(self, req_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., num_prompt_tokens: _Optional[int] = ..., num_generated_tokens: _Optional[int] = ..., kv_transfer_bytes: _Optional[int] = ..., prefill_ms: _Optional[float] = ..., logprobs: _Optional[_Iterable[_Union[_logprobs_pb2.TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_logprobs_pb2.TokenLogprob, _Mapping]]] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("req_id", "reason")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    reason: str
    def __init__(self, req_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("liveness_only",)
    LIVENESS_ONLY_FIELD_NUMBER: _ClassVar[int]
    liveness_only: bool
    def __init__(self, liveness_only: _Optional[bool] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "model", "kv_endpoints", "num_free_kv_blocks", "num_total_kv_blocks", "num_active_requests", "kv_block_size_tokens", "max_model_len_tokens", "num_pending_transfers", "measured_decode_step_base_s", "measured_decode_step_per_seq_s", "num_decode_steps", "prefill_cost_scale", "instance_id", "prefix_cache", "num_preemptions")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PENDING_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_DECODE_STEP_BASE_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_DECODE_STEP_PER_SEQ_S_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_COST_SCALE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    model: str
    kv_endpoints: _containers.RepeatedCompositeFieldContainer[KVEndpoint]
    num_free_kv_blocks: int
    num_total_kv_blocks: int
    num_active_requests: int
    kv_block_size_tokens: int
    max_model_len_tokens: int
    num_pending_transfers: int
    measured_decode_step_base_s: float
    measured_decode_step_per_seq_s: float
    num_decode_steps: int
    prefill_cost_scale: float
    instance_id: str
    prefix_cache: PrefixCacheStats
    num_preemptions: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., model: _Optional[str] = ..., kv_endpoints: _Optional[_Iterable[_Union[KVEndpoint, _Mapping]]] = ..., num_free_kv_blocks: _Optional[int] = ..., num_total_kv_blocks: _Optional[int] = ..., num_active_requests: _Optional[int] = ..., kv_block_size_tokens: _Optional[int] = ..., max_model_len_tokens: _Optional[int] = ..., num_pending_transfers: _Optional[int] = ..., measured_decode_step_base_s: _Optional[float] = ..., measured_decode_step_per_seq_s: _Optional[float] = ..., num_decode_steps: _Optional[int] = ..., prefill_cost_scale: _Optional[float] = ..., instance_id: _Optional[str] = ..., prefix_cache: _Optional[_Union[PrefixCacheStats, _Mapping]] = ..., num_preemptions: _Optional[int] = ...) -> None: ...

class PrefixCacheStats(_message.Message):
    __slots__ = ("enabled", "query_tokens", "hit_tokens", "query_blocks", "hit_blocks", "evictions", "num_cached_blocks")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUERY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    query_tokens: int
    hit_tokens: int
    query_blocks: int
    hit_blocks: int
    evictions: int
    num_cached_blocks: int
    def __init__(self, enabled: _Optional[bool] = ..., query_tokens: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., query_blocks: _Optional[int] = ..., hit_blocks: _Optional[int] = ..., evictions: _Optional[int] = ..., num_cached_blocks: _Optional[int] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: WorkerRole
    def __init__(self, role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...
