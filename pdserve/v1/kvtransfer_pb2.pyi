from pdserve.v1 import logprobs_pb2 as _logprobs_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVFrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_FRAME_KIND_UNSPECIFIED: _ClassVar[KVFrameKind]
    KV_FRAME_KIND_HEADER: _ClassVar[KVFrameKind]
    KV_FRAME_KIND_LAYER: _ClassVar[KVFrameKind]
    KV_FRAME_KIND_TRAILER: _ClassVar[KVFrameKind]
    KV_FRAME_KIND_ABORT: _ClassVar[KVFrameKind]
    KV_FRAME_KIND_ACK: _ClassVar[KVFrameKind]
    KV_FRAME_KIND_ERROR: _ClassVar[KVFrameKind]

class ChecksumKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_KIND_NONE: _ClassVar[ChecksumKind]
    CHECKSUM_KIND_CRC32: _ClassVar[ChecksumKind]
KV_FRAME_KIND_UNSPECIFIED: KVFrameKind
KV_FRAME_KIND_HEADER: KVFrameKind
KV_FRAME_KIND_LAYER: KVFrameKind
KV_FRAME_KIND_TRAILER: KVFrameKind
KV_FRAME_KIND_ABORT: KVFrameKind
KV_FRAME_KIND_ACK: KVFrameKind
KV_FRAME_KIND_ERROR: KVFrameKind
CHECKSUM_KIND_NONE: ChecksumKind
CHECKSUM_KIND_CRC32: ChecksumKind

class KVFrame(_message.Message):
    __slots__ = ("kind", "transfer_id", "layer_index", "payload_bytes", "crc32", "num_layers", "layer_bytes", "checksum", "trailer", "reason", "reply_address", "transfer_token", "frameless")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REPLY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FRAMELESS_FIELD_NUMBER: _ClassVar[int]
    kind: KVFrameKind
    transfer_id: int
    layer_index: int
    payload_bytes: int
    crc32: int
    num_layers: int
    layer_bytes: _containers.RepeatedScalarFieldContainer[int]
    checksum: ChecksumKind
    trailer: bytes
    reason: str
    reply_address: bytes
    transfer_token: bytes
    frameless: bool
    def __init__(self, kind: _Optional[_Union[KVFrameKind, str]] = ..., transfer_id: _Optional[int] = ..., layer_index: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., crc32: _Optional[int] = ..., num_layers: _Optional[int] = ..., layer_bytes: _Optional[_Iterable[int]] = ..., checksum: _Optional[_Union[ChecksumKind, str]] = ..., trailer: _Optional[bytes] = ..., reason: _Optional[str] = ..., reply_address: _Optional[bytes] = ..., transfer_token: _Optional[bytes] = ..., frameless: _Optional[bool] = ...) -> None: ...

class PrefillTrailer(_message.Message):
    __slots__ = ("req_id", "first_token_id", "num_prompt_tokens", "first_token_logprob", "prompt_logprobs", "prefill_ms", "kv_bytes", "num_cached_tokens")
    REQ_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    req_id: str
    first_token_id: int
    num_prompt_tokens: int
    first_token_logprob: _logprobs_pb2.TokenLogprob
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_logprobs_pb2.TokenLogprob]
    prefill_ms: float
    kv_bytes: int
    num_cached_tokens: int
    def __init__(self, req_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., first_token_logprob: _Optional[_Union[_logprobs_pb2.TokenLogprob, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_logprobs_pb2.TokenLogprob, _Mapping]]] = ..., prefill_ms: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...
