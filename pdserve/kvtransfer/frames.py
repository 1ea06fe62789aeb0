"""Control frames of a KV transfer (protobuf `KVFrame`) and the checks both backends apply.

TCP sends a frame as a 4-byte big-endian length then the protobuf bytes; UCX puts it in a fixed
slot (`SLOT_BYTES`) so the receiver can post a receive before knowing the exact size.
"""
from __future__ import annotations

import hmac
import struct

from pdserve.kvtransfer.base import TransferLayout
from pdserve.v1 import kvtransfer_pb2 as pb

_LEN = struct.Struct(">I")
_SLOT_LEN = struct.Struct(">H")
# Small enough to stay under UCX's eager threshold (one message, no rendezvous round trip) and
# big enough for any control frame: headers carry totals, not per-layer lists; reasons are clipped.
SLOT_BYTES = 1024
MAX_REASON_CHARS = 400
# Refuse absurd lengths before allocating: a corrupted length prefix must not allocate gigabytes.
# The trailer is the largest frame: with prompt logprobs it holds ~20 alternatives per prompt token.
MAX_FRAME_BYTES = 64 << 20
MAX_TRAILER_BYTES = MAX_FRAME_BYTES - 1024

Kind = pb.KVFrameKind


def header(layout: TransferLayout, checksum: bool) -> pb.KVFrame:
    return pb.KVFrame(
        kind=pb.KV_FRAME_KIND_HEADER, transfer_id=layout.transfer_id, num_layers=layout.num_layers,
        payload_bytes=layout.total_nbytes,
        checksum=pb.CHECKSUM_KIND_CRC32 if checksum else pb.CHECKSUM_KIND_NONE,
        transfer_token=layout.token,
    )


def encode_stream(frame: pb.KVFrame) -> bytes:
    data = frame.SerializeToString()
    return _LEN.pack(len(data)) + data


def frame_length(prefix: bytes) -> int:
    (n,) = _LEN.unpack(prefix)
    if n > MAX_FRAME_BYTES:
        raise ValueError(f"frame length {n} exceeds {MAX_FRAME_BYTES}: corrupted stream")
    return n


def abort_frame(reason: str) -> pb.KVFrame:
    return pb.KVFrame(kind=pb.KV_FRAME_KIND_ABORT, reason=reason[:MAX_REASON_CHARS])


def encode_slot(frame: pb.KVFrame) -> bytearray:
    data = frame.SerializeToString()
    if len(data) + _SLOT_LEN.size > SLOT_BYTES:
        raise ValueError(f"frame of {len(data)} bytes does not fit a {SLOT_BYTES}-byte slot")
    slot = bytearray(SLOT_BYTES)
    slot[: _SLOT_LEN.size] = _SLOT_LEN.pack(len(data))
    slot[_SLOT_LEN.size: _SLOT_LEN.size + len(data)] = data
    return slot


def decode(data: bytes | memoryview) -> pb.KVFrame:
    frame = pb.KVFrame()
    frame.ParseFromString(bytes(data))
    return frame


def decode_slot(slot: bytes | memoryview) -> pb.KVFrame:
    (n,) = _SLOT_LEN.unpack(bytes(slot[: _SLOT_LEN.size]))
    if n > len(slot) - _SLOT_LEN.size:
        raise ValueError("frame slot length is corrupted")
    return decode(slot[_SLOT_LEN.size: _SLOT_LEN.size + n])


def check_header(frame: pb.KVFrame, layout: TransferLayout) -> str | None:
    """Why a header does not match what the receiver was armed for, or None."""
    if frame.kind != pb.KV_FRAME_KIND_HEADER:
        return f"expected a header frame, got {Kind.Name(frame.kind)}"
    if frame.transfer_id != layout.transfer_id:
        return f"header names transfer {frame.transfer_id}, expected {layout.transfer_id}"
    if not hmac.compare_digest(frame.transfer_token, layout.token):
        return f"wrong token for transfer {layout.transfer_id}"
    if frame.num_layers != layout.num_layers or frame.payload_bytes != layout.total_nbytes:
        return (f"layout mismatch: sender has {frame.num_layers} layers / {frame.payload_bytes} bytes, "
                f"receiver expects {layout.num_layers} layers / {layout.total_nbytes} bytes")
    return None


def check_layer(frame: pb.KVFrame, expected_index: int, layout: TransferLayout) -> str | None:
    if frame.kind == pb.KV_FRAME_KIND_ABORT:
        return f"sender aborted: {frame.reason}"
    if frame.kind != pb.KV_FRAME_KIND_LAYER:
        return f"expected layer {expected_index}, got {Kind.Name(frame.kind)}"
    if frame.layer_index != expected_index:
        return f"layer {frame.layer_index} arrived, expected layer {expected_index}"
    if frame.payload_bytes != layout.layer_nbytes[expected_index]:
        return (f"layer {expected_index} is {frame.payload_bytes} bytes, "
                f"expected {layout.layer_nbytes[expected_index]}")
    return None
