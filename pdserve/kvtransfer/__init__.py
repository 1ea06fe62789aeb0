"""KV cache transfer between prefill and decode workers; see base.py for the contract.

Backends are chosen by name and imported only when chosen (ucxx loads native UCX libraries).
"""
from __future__ import annotations

from pdserve.clock import Clock
from pdserve.kvtransfer.base import (BaseKVAgent, BaseKVReceiver, BaseKVSender, KVTransferError,
                                     MAX_TRANSFER_ID, TransferLayout, TransferState, as_bytes_view, new_token)

BACKENDS = ("ucx", "tcp", "fake")


def create_agent(backend: str, clock: Clock, **options) -> BaseKVAgent:
    """options: tcp -> host, port, stall_timeout_s; ucx -> tls, stall_timeout_s, spin_s; fake -> fabric."""
    if backend == "tcp":
        from pdserve.kvtransfer.backends.tcp import TcpAgent
        return TcpAgent(clock, **options)
    if backend == "ucx":
        from pdserve.kvtransfer.backends.ucx import UcxAgent
        return UcxAgent(clock, **options)
    if backend == "fake":
        from pdserve.kvtransfer.backends.fake import FakeAgent
        return FakeAgent(clock, **options)
    raise ValueError(f"unknown KV transfer backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "BaseKVAgent", "BaseKVReceiver", "BaseKVSender", "KVTransferError",
           "MAX_TRANSFER_ID", "TransferLayout", "TransferState", "as_bytes_view", "create_agent", "new_token"]
