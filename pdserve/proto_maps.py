"""The one place where policy enums meet their protobuf values (adapters import this; policy
code never sees protobuf). Every role <-> WorkerRole conversion goes through here."""
from __future__ import annotations

from pdserve.policy.registry import Role
from pdserve.v1 import worker_pb2

ROLE_TO_PROTO = {Role.PREFILL: worker_pb2.WORKER_ROLE_PREFILL, Role.DECODE: worker_pb2.WORKER_ROLE_DECODE,
                 Role.AGGREGATED: worker_pb2.WORKER_ROLE_AGGREGATED}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}


def role_name(proto_role: int) -> str:
    """'prefill' | 'decode' | 'aggregated', or '?' for a value this build does not know."""
    role = ROLE_FROM_PROTO.get(proto_role)
    return role.value if role is not None else "?"
