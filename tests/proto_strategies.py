"""Hypothesis strategies for any protobuf message, built from its descriptor: every field may be
unset or hold a random value of its type, extremes included (huge ints, NaN, long or odd
strings, unknown enum numbers), nested messages to a bounded depth."""
from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

_INT_RANGES = {
    F.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), F.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    F.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1), F.TYPE_UINT32: (0, (1 << 32) - 1),
    F.TYPE_FIXED32: (0, (1 << 32) - 1), F.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    F.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1), F.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    F.TYPE_UINT64: (0, (1 << 64) - 1), F.TYPE_FIXED64: (0, (1 << 64) - 1),
}
_MAX_REPEATED = 6


def _ints(lo: int, hi: int):
    # Mostly small values (they reach deeper code), with the extremes of the type mixed in.
    return st.one_of(st.integers(0, 64).map(lambda v: max(lo, min(hi, v))), st.integers(lo, hi),
                     st.sampled_from([lo, hi]))


def _scalar(field):
    if field.type in _INT_RANGES:
        return _ints(*_INT_RANGES[field.type])
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if field.type == F.TYPE_FLOAT else 64)
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_STRING:
        return st.text(max_size=64)
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == F.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-5, 1000))   # unknown numbers too
    raise TypeError(f"unhandled field type {field.type} of {field.full_name}")


def _value(field, depth: int):
    if field.type == F.TYPE_MESSAGE:
        return messages(field.message_type._concrete_class, depth + 1)
    return _scalar(field)


@st.composite
def _message(draw, cls, depth: int):
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if field.type == F.TYPE_MESSAGE and depth >= 2:
            continue
        if not draw(st.booleans()):
            continue
        is_map = field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
        if is_map:
            continue     # none in our protocol; skipped rather than half-supported
        if field.is_repeated:
            values = draw(st.lists(_value(field, depth), max_size=_MAX_REPEATED))
            target = getattr(msg, field.name)
            if field.type == F.TYPE_MESSAGE:
                for v in values:
                    target.add().CopyFrom(v)
            else:
                target.extend(values)
        elif field.type == F.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(msg, field.name, draw(_value(field, depth)))
    return msg


def messages(cls, depth: int = 0):
    return _message(cls, depth)
