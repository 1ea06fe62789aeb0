"""Channel helpers for talking to workers (the router, benches and tests use them). Requests are
orchestrated in one place only: pdserve/router/request_flow.py."""
from __future__ import annotations

import grpc

_MAX_MESSAGE_BYTES = 64 << 20


def channel(port: int, host: str = "127.0.0.1") -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"{host}:{port}", options=[("grpc.max_receive_message_length",
                                                                 _MAX_MESSAGE_BYTES)])
