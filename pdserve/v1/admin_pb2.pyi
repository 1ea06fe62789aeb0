from pdserve.v1 import router_pb2 as _router_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scenario(_message.Message):
    __slots__ = ("name", "ttft_slo_ms", "tpot_slo_ms", "header_values", "tenants", "prefix_tokens", "prefix_hashes", "min_prefill", "max_prefill", "min_decode", "max_decode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    HEADER_VALUES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HASHES_FIELD_NUMBER: _ClassVar[int]
    MIN_PREFILL_FIELD_NUMBER: _ClassVar[int]
    MAX_PREFILL_FIELD_NUMBER: _ClassVar[int]
    MIN_DECODE_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    ttft_slo_ms: float
    tpot_slo_ms: float
    header_values: _containers.RepeatedScalarFieldContainer[str]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    prefix_tokens: int
    prefix_hashes: _containers.RepeatedScalarFieldContainer[str]
    min_prefill: int
    max_prefill: int
    min_decode: int
    max_decode: int
    def __init__(self, name: _Optional[str] = ..., ttft_slo_ms: _Optional[float] = ..., tpot_slo_ms: _Optional[float] = ..., header_values: _Optional[_Iterable[str]] = ..., tenants: _Optional[_Iterable[str]] = ..., prefix_tokens: _Optional[int] = ..., prefix_hashes: _Optional[_Iterable[str]] = ..., min_prefill: _Optional[int] = ..., max_prefill: _Optional[int] = ..., min_decode: _Optional[int] = ..., max_decode: _Optional[int] = ...) -> None: ...

class Ratio(_message.Message):
    __slots__ = ("scenario", "num_prefill", "num_decode", "pinned")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    num_prefill: int
    num_decode: int
    pinned: bool
    def __init__(self, scenario: _Optional[str] = ..., num_prefill: _Optional[int] = ..., num_decode: _Optional[int] = ..., pinned: _Optional[bool] = ...) -> None: ...

class RatioChange(_message.Message):
    __slots__ = ("scenario", "at_unix_s", "old_prefill", "old_decode", "new_prefill", "new_decode", "reason", "inputs_json")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    OLD_PREFILL_FIELD_NUMBER: _ClassVar[int]
    OLD_DECODE_FIELD_NUMBER: _ClassVar[int]
    NEW_PREFILL_FIELD_NUMBER: _ClassVar[int]
    NEW_DECODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INPUTS_JSON_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    at_unix_s: float
    old_prefill: int
    old_decode: int
    new_prefill: int
    new_decode: int
    reason: str
    inputs_json: str
    def __init__(self, scenario: _Optional[str] = ..., at_unix_s: _Optional[float] = ..., old_prefill: _Optional[int] = ..., old_decode: _Optional[int] = ..., new_prefill: _Optional[int] = ..., new_decode: _Optional[int] = ..., reason: _Optional[str] = ..., inputs_json: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScenarioName(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ScenarioList(_message.Message):
    __slots__ = ("scenarios",)
    SCENARIOS_FIELD_NUMBER: _ClassVar[int]
    scenarios: _containers.RepeatedCompositeFieldContainer[Scenario]
    def __init__(self, scenarios: _Optional[_Iterable[_Union[Scenario, _Mapping]]] = ...) -> None: ...

class RatioHistory(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[RatioChange]
    def __init__(self, changes: _Optional[_Iterable[_Union[RatioChange, _Mapping]]] = ...) -> None: ...

class SetRatioRequest(_message.Message):
    __slots__ = ("scenario", "num_prefill", "num_decode", "pin")
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    scenario: str
    num_prefill: int
    num_decode: int
    pin: bool
    def __init__(self, scenario: _Optional[str] = ..., num_prefill: _Optional[int] = ..., num_decode: _Optional[int] = ..., pin: _Optional[bool] = ...) -> None: ...

class WorkerRef(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class SetWorkerRoleRequest(_message.Message):
    __slots__ = ("worker_id", "role")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...
