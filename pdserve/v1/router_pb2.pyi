from pdserve.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "role", "model", "grpc_address", "kv_endpoints", "num_total_kv_blocks", "kv_block_size_tokens", "max_model_len_tokens", "scenario", "prefill_tokens_per_s", "decode_step_base_s", "decode_step_per_seq_s", "instance_id", "max_batch_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_BASE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_PER_SEQ_S_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _worker_pb2.WorkerRole
    model: str
    grpc_address: str
    kv_endpoints: _containers.RepeatedCompositeFieldContainer[_worker_pb2.KVEndpoint]
    num_total_kv_blocks: int
    kv_block_size_tokens: int
    max_model_len_tokens: int
    scenario: str
    prefill_tokens_per_s: float
    decode_step_base_s: float
    decode_step_per_seq_s: float
    instance_id: str
    max_batch_size: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_worker_pb2.WorkerRole, str]] = ..., model: _Optional[str] = ..., grpc_address: _Optional[str] = ..., kv_endpoints: _Optional[_Iterable[_Union[_worker_pb2.KVEndpoint, _Mapping]]] = ..., num_total_kv_blocks: _Optional[int] = ..., kv_block_size_tokens: _Optional[int] = ..., max_model_len_tokens: _Optional[int] = ..., scenario: _Optional[str] = ..., prefill_tokens_per_s: _Optional[float] = ..., decode_step_base_s: _Optional[float] = ..., decode_step_per_seq_s: _Optional[float] = ..., instance_id: _Optional[str] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("lease_s",)
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    lease_s: float
    def __init__(self, lease_s: _Optional[float] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("num_free_kv_blocks", "num_active_requests", "held_req_ids", "stored_block_hashes", "evicted_block_hashes", "block_hashes_reset", "prefix_cache", "num_preemptions")
    NUM_FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HELD_REQ_IDS_FIELD_NUMBER: _ClassVar[int]
    STORED_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_RESET_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    num_free_kv_blocks: int
    num_active_requests: int
    held_req_ids: _containers.RepeatedScalarFieldContainer[str]
    stored_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    evicted_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    block_hashes_reset: bool
    prefix_cache: _worker_pb2.PrefixCacheStats
    num_preemptions: int
    def __init__(self, num_free_kv_blocks: _Optional[int] = ..., num_active_requests: _Optional[int] = ..., held_req_ids: _Optional[_Iterable[str]] = ..., stored_block_hashes: _Optional[_Iterable[int]] = ..., evicted_block_hashes: _Optional[_Iterable[int]] = ..., block_hashes_reset: _Optional[bool] = ..., prefix_cache: _Optional[_Union[_worker_pb2.PrefixCacheStats, _Mapping]] = ..., num_preemptions: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load", "instance_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: WorkerLoad
    instance_id: str
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("req_id", "model", "prompt_token_ids", "sampling", "timeout_s", "ttft_slo_ms", "scenario_header", "tenant", "resume_output_token_ids")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_HEADER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RESUME_OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _worker_pb2.SamplingParams
    timeout_s: float
    ttft_slo_ms: float
    scenario_header: str
    tenant: str
    resume_output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, req_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_worker_pb2.SamplingParams, _Mapping]] = ..., timeout_s: _Optional[float] = ..., ttft_slo_ms: _Optional[float] = ..., scenario_header: _Optional[str] = ..., tenant: _Optional[str] = ..., resume_output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "role", "model", "grpc_address", "alive", "num_free_kv_blocks", "num_total_kv_blocks", "num_active_requests", "seconds_since_heartbeat", "scenario", "draining", "prefix_cache", "num_preemptions")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _worker_pb2.WorkerRole
    model: str
    grpc_address: str
    alive: bool
    num_free_kv_blocks: int
    num_total_kv_blocks: int
    num_active_requests: int
    seconds_since_heartbeat: float
    scenario: str
    draining: bool
    prefix_cache: _worker_pb2.PrefixCacheStats
    num_preemptions: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_worker_pb2.WorkerRole, str]] = ..., model: _Optional[str] = ..., grpc_address: _Optional[str] = ..., alive: _Optional[bool] = ..., num_free_kv_blocks: _Optional[int] = ..., num_total_kv_blocks: _Optional[int] = ..., num_active_requests: _Optional[int] = ..., seconds_since_heartbeat: _Optional[float] = ..., scenario: _Optional[str] = ..., draining: _Optional[bool] = ..., prefix_cache: _Optional[_Union[_worker_pb2.PrefixCacheStats, _Mapping]] = ..., num_preemptions: _Optional[int] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "prefix_index_blocks", "prefix_index_entries", "counters")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_INDEX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_INDEX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    prefix_index_blocks: int
    prefix_index_entries: int
    counters: RouterCounters
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., prefix_index_blocks: _Optional[int] = ..., prefix_index_entries: _Optional[int] = ..., counters: _Optional[_Union[RouterCounters, _Mapping]] = ...) -> None: ...

class RouterCounters(_message.Message):
    __slots__ = ("routed", "forwarded", "rejected", "migrated", "failed", "local_prefills")
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILLS_FIELD_NUMBER: _ClassVar[int]
    routed: int
    forwarded: int
    rejected: int
    migrated: int
    failed: int
    local_prefills: int
    def __init__(self, routed: _Optional[int] = ..., forwarded: _Optional[int] = ..., rejected: _Optional[int] = ..., migrated: _Optional[int] = ..., failed: _Optional[int] = ..., local_prefills: _Optional[int] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id", "instance_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    instance_id: str
    def __init__(self, worker_id: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...
