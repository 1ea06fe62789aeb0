"""Channel helper for talking to workers (the router, benches and tests use it). Requests are
orchestrated in one place only: pdserve/router/request_flow.py."""
from __future__ import annotations

import grpc

from pdserve import rpc
from pdserve.cluster_auth import Credential


def channel(port: int, host: str = "127.0.0.1", credential: Credential | None = None) -> grpc.aio.Channel:
    return rpc.channel(f"{host}:{port}", credential)
